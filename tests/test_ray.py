"""Ray: the batch on Ray Data (same files as the local batch, resumable, a worker killed mid-run) and the
Serve application (OpenAI route, the service's access rules, overload, a replica killed under load), on one
local Ray on 127.0.0.1.

One Ray session serves the whole module (started as `pixart-sigma batch --ray` starts its own); the
batch tests run before Serve takes its share of the CPUs. The demo model, a few steps, 64x64.
"""

import base64
import concurrent.futures
import io
import json
import re
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray", reason="the ray extra: pip install -e '.[ray]'")

import httpx  # noqa: E402
import psutil  # noqa: E402  (accelerate's dependency)

from pixart_sigma import CheckpointError, PixArtSigmaModel, SettingsError, read_settings  # noqa: E402
from pixart_sigma.checkpoints import DEMO_DIR  # noqa: E402
from pixart_sigma.cli import main  # noqa: E402
from pixart_sigma.images import safe_stem  # noqa: E402
from pixart_sigma.lora_formats import write_lora  # noqa: E402
from test_loras import _random_lora  # noqa: E402
from pixart_sigma.integrations.ray import batch as on_ray  # noqa: E402
from serving import free_port, wait_until, write_demo_lora  # noqa: E402

STEPS = "3"
PROMPTS = ["a red circle on a blue background", "a large yellow triangle at the top",
           "a small green square at the left", "a red circle on a blue background",  # twice: two batches
           "a blue circle at the bottom"]
SETTINGS = ["--model-name", "demo", "--num-inference-steps", STEPS, "--seed", "7", "--num-images-per-prompt", "2"]
RAY_CPUS = 6  # logical: two batch workers at this process's thread count, then the Serve replica


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    on_ray.start_local_ray(RAY_CPUS)
    yield
    if _serve_started:
        from ray import serve

        serve.shutdown()
    ray.shutdown()


_serve_started = []


def _batch(capsys, prompts_file, out, *flags):
    code = main(["batch", str(prompts_file), "-o", str(out), "-q", *SETTINGS, *map(str, flags)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# a comment\n" + "\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def local_output(prompts_file, tmp_path_factory):
    """The local batch's files: what every Ray run must give, byte for byte."""
    out = tmp_path_factory.mktemp("local")
    assert main(["batch", str(prompts_file), "-o", str(out), "-q", *SETTINGS]) == 0
    return _files(out)


# -- batch -------------------------------------------------------------------------------------------

def test_ray_batch_writes_the_local_batchs_files_byte_for_byte(prompts_file, local_output, tmp_path, capsys):
    code, out, err = _batch(capsys, prompts_file, tmp_path, "--ray", "--workers", "2")
    assert code == 0, err
    assert _files(tmp_path) == local_output  # names and bytes (pixels and settings) alike, two workers or one
    assert len(local_output) == 2 * len(PROMPTS)
    assert sorted(line.rsplit("/", 1)[-1] for line in out.split()) == sorted(local_output)
    assert f"{len(PROMPTS)} prompt(s) generated, 0 already done" in err


def test_ray_batch_resumes_and_completes_a_random_seeds_batch_with_its_seed(prompts_file, tmp_path, capsys):
    random = [flag if flag != "7" else "-1" for flag in SETTINGS]
    assert main(["batch", str(prompts_file), "-o", str(tmp_path), "-q", "--ray", "--workers", "1", *random]) == 0
    first = _files(tmp_path)
    names = sorted(first)
    (tmp_path / names[1]).unlink()  # half of one prompt's batch ...
    for name in names[2:4]:  # ... and the whole of another
        (tmp_path / name).unlink()
    capsys.readouterr()
    assert main(["batch", str(prompts_file), "-o", str(tmp_path), "-q", "--ray", "--workers", "1", *random]) == 0
    out, err = capsys.readouterr()
    assert sorted(line.rsplit("/", 1)[-1] for line in out.split()) == names[1:4]  # only what was missing
    assert f"2 prompt(s) generated, {len(PROMPTS) - 2} already done" in err
    again = _files(tmp_path)
    assert again[names[1]] == first[names[1]]  # the earlier run's seed: the same image again
    assert sorted(again) == names and not any(name.startswith(".partial") for name in os.listdir(tmp_path))
    capsys.readouterr()
    assert main(["batch", str(prompts_file), "-o", str(tmp_path), "-q", "--ray", *random]) == 0
    assert f"0 prompt(s) generated, {len(PROMPTS)} already done" in capsys.readouterr().err  # Ray not even needed


def _kill_a_worker_when(started, done: threading.Event, killed: list):
    """SIGKILL one batch worker's process as soon as `started()` is true (mid-run), once."""
    def worker_processes():
        return [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::MapWorker")]

    while not done.is_set():
        if started():
            victims = worker_processes()
            if victims:
                victims[0].send_signal(signal.SIGKILL)
                killed.append(victims[0].pid)
                return
        time.sleep(0.02)


def test_a_batch_worker_killed_mid_run_loses_nothing_and_doubles_nothing(local_output, tmp_path):
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_when,
                              args=(lambda: any(tmp_path.glob("*.png")), done, killed))
    killer.start()
    try:
        paths = on_ray.generate(PROMPTS, tmp_path, workers=2, progress=False, model_name="demo",
                                num_inference_steps=int(STEPS), seed=7, num_images_per_prompt=2)
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was killed: the run ended before the first image was written"
    assert _files(tmp_path) == local_output  # every image once, whole, with the undisturbed run's pixels
    names = [[path.name for path in row] for row in paths]  # each prompt's files, in the input's order
    assert sorted(sum(names, [])) == sorted(local_output) and names[0] != names[3]
    assert all(row[0].startswith(safe_stem(prompt, 32)) for row, prompt in zip(names, PROMPTS))


def test_python_entry_takes_a_dataset_with_per_row_settings_and_returns_images():
    rows = [{"prompt": "a red circle on a blue background", "seed": 5, "guidance_scale": None},
            {"prompt": "a large yellow triangle at the top", "seed": None, "guidance_scale": 2.0}]
    images = on_ray.generate(ray.data.from_items(rows), workers=1, progress=False, model_name="demo",
                             num_inference_steps=int(STEPS), seed=11)
    model = PixArtSigmaModel(model_name="demo", num_inference_steps=int(STEPS), seed=11)
    expected = [model.generate(rows[0]["prompt"], seed=5), model.generate(rows[1]["prompt"], guidance_scale=2.0)]
    for got, want in zip(images, expected):
        assert len(got) == len(want) == 1
        assert np.array_equal(np.asarray(got[0]), np.asarray(want[0]))
        assert read_settings(got[0]) == read_settings(want[0])
    assert [read_settings(row[0])["seed"] for row in images] == [5, 11]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_rows_with_a_picture_are_edits_with_the_librarys_pixels_named_by_their_pictures(tmp_path):
    model = PixArtSigmaModel(model_name="demo", num_inference_steps=int(STEPS), seed=11)
    sources = [model.generate("a large red circle on the left on a white background", seed=0)[0],
               model.generate("a large blue square on the right on a white background", seed=0)[0]]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    prompt = "a large green circle on the left on a white background"
    picture_path = tmp_path / "source.png"
    sources[1].save(picture_path)
    rows = [{"prompt": prompt, "image": _png(sources[0]), "strength": 0.5},
            {"prompt": prompt, "image": str(picture_path), "mask": _png(mask), "strength": 0.9, "mask_blur": 2}]
    paths = on_ray.generate(rows, tmp_path / "out", workers=1, progress=False, model_name="demo",
                            num_inference_steps=int(STEPS), seed=11)
    assert paths[0][0].name != paths[1][0].name  # the same prompt and seed: the pictures tell them apart
    expected = [model.generate(prompt, image=sources[0], strength=0.5),
                model.generate(prompt, image=sources[1], mask=mask, strength=0.9, mask_blur=2)]
    for (path,), (want,) in zip(paths, expected):
        with Image.open(path) as got:
            assert np.array_equal(np.asarray(got), np.asarray(want))
        assert read_settings(path) == read_settings(want)


def test_a_workers_refusal_comes_back_as_the_librarys_error(prompts_file, tmp_path, capsys):
    # The checkpoint passes the driver's check (no weights are read there) but is not on the worker's node.
    code, _, err = _batch(capsys, prompts_file, tmp_path, "--ray", "--workers", "1", "--model-name",
                          "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS")
    assert code == 2, err
    assert re.search(r"error: line [0-9]+ \(", err) and "on a Ray worker: model_name='PixArt-alpha/PixArt-Sigma-XL-2-2K-MS' needs " \
        "weights" in err and "hf download" in err
    assert not list(tmp_path.iterdir())


@pytest.fixture
def no_ray_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was asked to start before the input was checked")

    monkeypatch.setattr(on_ray.Session, "open", classmethod(refuse))


def test_bad_input_is_refused_before_ray_starts(no_ray_start, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nbad \x07 bell\n", encoding="utf-8")
    code, _, err = _batch(capsys, prompts, tmp_path / "out", "--ray")
    assert code == 2 and f"{prompts}:2: prompt contains the control character U+0007" in err
    code, _, err = _batch(capsys, prompts.with_name("missing.txt"), tmp_path / "out", "--ray")
    assert code == 2 and "No such file" in err
    prompts.write_text("a red circle\n", encoding="utf-8")
    code, _, err = _batch(capsys, prompts, tmp_path / "out", "--ray", "--guidance-scale", "99")
    assert code == 2 and "guidance_scale" in err
    code, _, err = _batch(capsys, prompts, tmp_path / "out", "--workers", "2")
    assert code == 2 and "add --ray" in err
    with pytest.raises(SettingsError) as error:
        on_ray.generate(["a red circle", {"prompt": "a square", "seed": -5, "colour": "red"}, {"seed": 1},
                         {"prompt": "x", "model_name": "demo"}, {"prompt": "x", "image": b"not a picture"},
                         {"prompt": "x", "strength": 0.5}], model_name="demo")
    message = str(error.value)
    for expected in ("row 1: seed=-5", "row 1: colour is not a setting", "row 2: prompt is missing",
                     "row 3: model_name is the same for the whole run", "row 4: image (bytes) is not an image",
                     "row 5: strength apply to edits only"):
        assert expected in message


# -- batch with LoRAs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    config = json.loads((DEMO_DIR / "transformer" / "config.json").read_text())
    write_lora(folder / "style.safetensors", _random_lora(config, 1), "kohya")
    write_lora(folder / "other", _random_lora(config, 2), "peft")  # a PEFT folder: its two files travel
    return folder


def test_ray_batch_applies_loras_as_the_local_batch_does_and_names_them_by_sha256(lora_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n", encoding="utf-8")
    loras = ["--lora-dir", lora_folder, "--lora", "style:0.5", "--lora", "other"]
    code, _, err = _batch(capsys, prompts, tmp_path / "local", *loras)
    assert code == 0, err
    code, _, err = _batch(capsys, prompts, tmp_path / "ray", "--ray", "--workers", "1", *loras)
    assert code == 0, err
    made = _files(tmp_path / "ray")
    assert made == _files(tmp_path / "local") and len(made) == 4  # names, pixels and records alike
    record = read_settings(tmp_path / "ray" / sorted(made)[0])
    assert [(lora["name"], lora["scale"]) for lora in record["loras"]] == [("style", 0.5), ("other", 1.0)]
    # Keyed by each LoRA's SHA-256 and scale: the same files renamed in another folder, or named by path, are
    # the same batch (nothing left to make); another scale is another batch.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(lora_folder / "style.safetensors", moved / "renamed.safetensors")
    shutil.copytree(lora_folder / "other", moved / "peft-copy")
    code, _, err = _batch(capsys, prompts, tmp_path / "ray", "--ray", "--lora-dir", moved, "--lora", "renamed:0.5",
                          "--lora", moved / "peft-copy")
    assert code == 0 and "0 prompt(s) generated, 2 already done" in err, err
    plan = on_ray.plan(on_ray.check_rows(PROMPTS[:1], {"model_name": "demo", "num_inference_steps": int(STEPS),
                                                       "seed": 7, "num_images_per_prompt": 2,
                                                       "loras": [{"name": "style", "scale": 0.6},
                                                                 {"name": "other", "scale": 1.0}]}),
                       {}, tmp_path / "ray", lora_dir=lora_folder)
    assert not set(plan.work[0].item.names) & set(made) and plan.work[0].missing == [0, 1]


def test_a_worker_refuses_a_lora_whose_bytes_are_not_the_ones_hashed(tmp_path):
    sent = [{"given": "style", "sha256": "0" * 64, "files": [("style.safetensors", ray.put(b"other bytes"))],
             "weights": "style.safetensors", "top": "style.safetensors"}]
    worker = on_ray.Worker({"model_name": "demo", "loras": [{"name": "style", "scale": 1.0}]}, None, loras=sent)
    out = worker({"row": [0], "prompt": ["a red circle"], "overrides": ["{}"], "seed": [1], "missing": ["[0]"],
                  "picture": [b""], "mask": [b""]})
    error = json.loads(out["error"][0])
    assert error["kind"] == "CheckpointError" and out["png"] == [b""]
    assert error["problems"][0].startswith("loras: style (style.safetensors) reached this worker with SHA-256 ")
    assert f"not the {'0' * 64} the driver hashed" in error["problems"][0]


def test_a_lora_changed_after_the_plan_is_refused_naming_it(lora_folder, tmp_path):
    lora = tmp_path / "changing.safetensors"
    shutil.copy(lora_folder / "style.safetensors", lora)
    settings = {"model_name": "demo", "num_inference_steps": 1, "seed": 1, "loras": [{"name": str(lora), "scale": 1.0}]}
    plan = on_ray.plan(on_ray.check_rows(["a red circle"], settings), settings, tmp_path / "out")
    lora.write_bytes((lora_folder / "other" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=f"loras: {lora} changed since the batch was planned"):
        on_ray.run(plan, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_missing_lora_is_refused_before_ray_starts(no_ray_start, lora_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    code, _, err = _batch(capsys, prompts, tmp_path / "out", "--ray", "--lora-dir", lora_folder, "--lora", "missing")
    assert code == 2 and "loras.0.name='missing' is not in the LoRA folder" in err and "other, style" in err, err
    with pytest.raises(SettingsError) as error:
        on_ray.generate(["a red circle", {"prompt": "a square", "loras": [{"name": "nope"}]}], model_name="demo",
                        lora_dir=lora_folder)
    assert "row 1: loras.0.name='nope' is not in the LoRA folder" in str(error.value)


# -- Serve -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve_loras(tmp_path_factory):
    """The Serve application's LoRA folder: one LoRA for the demo model."""
    folder = tmp_path_factory.mktemp("serve-loras")
    write_demo_lora(folder / "style.safetensors", 1)
    return folder


@pytest.fixture(scope="module")
def service(serve_loras):
    """The Serve application on the demo model: one replica, a queue of 2, its proxy on 127.0.0.1."""
    from ray import serve

    from pixart_sigma.integrations.ray import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _serve_started.append(True)
    serve.run(app({"model_name": "demo", "device": "cpu", "max_queued_requests": "2",
                   "health_check_period_s": "2", "lora_dir": str(serve_loras)}), name="pixart", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client


def _post(client, **body):
    return client.post("/v1/images/generations", json=body)


def test_serve_openai_route_makes_images_with_their_settings(service):
    response = _post(service, prompt="a red circle on a blue background", n=2, size="64x64", seed=3,
                     num_inference_steps=int(STEPS))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["seed"] for item in body["data"]] == [3, 4] and body["model"] == "demo" and body["size"] == "64x64"
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][1]["b64_json"])))
    record = read_settings(image)
    assert (record["prompt"], record["seed"], record["num_inference_steps"]) == (PROMPTS[0], 4, int(STEPS))
    assert service.get("/healthz").json() == {"status": "ok"}
    assert "num_inference_steps" in service.get("/v1/schema").json()["properties"]


def test_serve_applies_extra_body_loras_of_its_folder_and_refuses_others(service, serve_loras):
    def image(**body):
        response = _post(service, prompt=PROMPTS[0], size="64x64", seed=3, num_inference_steps=int(STEPS), **body)
        assert response.status_code == 200, response.text
        picture = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        return np.asarray(picture.convert("RGB")), read_settings(picture)

    base, _ = image()
    styled, record = image(loras=[{"name": "style", "scale": 1.0}])
    zero, _ = image(loras=[{"name": "style", "scale": 0}])
    assert [(lora["name"], lora["scale"], len(lora["sha256"])) for lora in record["loras"]] == [("style", 1.0, 64)]
    assert not np.array_equal(styled, base) and np.array_equal(zero, base)
    missing = _post(service, prompt="x", loras=[{"name": "nowhere"}])  # refused by the replica, which has the folder
    assert missing.status_code == 400, missing.text
    assert missing.json()["error"]["param"] == "loras" and "loras.0.name='nowhere'" in missing.text
    assert "style" in missing.json()["error"]["message"] and str(serve_loras) not in missing.text
    path = _post(service, prompt="x", loras=[{"name": str(serve_loras / "style.safetensors")}])  # refused here
    assert path.status_code == 400 and "never a path" in path.json()["error"]["message"]


def test_serve_edits_route_edits_a_picture_as_the_library_does(service):
    model = PixArtSigmaModel(model_name="demo", num_inference_steps=int(STEPS))
    source = model.generate("a large red circle on the left on a white background", seed=0)[0].convert("RGBA")
    source.paste((0, 0, 0, 0), (32, 0, 64, 64))  # OpenAI's convention: the transparent part is edited
    prompt = "a large red circle on the left and a large green square on the right on a white background"
    form = {"prompt": prompt, "seed": "5", "num_inference_steps": STEPS}
    response = service.post("/v1/images/edits", data=form, files={"image": ("a.png", _png(source), "image/png")})
    assert response.status_code == 200, response.text
    got = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica's (num_cpus=1): on a CPU the thread count can change pixels
    try:
        want = model.generate(prompt, image=_png(source), mask=_png(source), strength=1.0, seed=5)[0]
    finally:
        torch.set_num_threads(threads)
    assert read_settings(got) == read_settings(want)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    refused = service.post("/v1/images/edits", data=form, files={"image": ("a.png", b"not a picture", "image/png")})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image", refused.text
    as_json = service.post("/v1/images/edits", json={"prompt": prompt})
    assert as_json.status_code == 400, as_json.text


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "", "size": "63x64"}, 400, "size"),
    ({"prompt": "x", "device": "cuda"}, 400, "device"),
    ({"prompt": "x", "n": 11}, 400, "n"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "x", "colour": "red"}, 400, None),
])
def test_serve_refuses_bad_input_in_openais_shape(service, body, status, field):
    response = _post(service, **body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if field:
        assert field in error["message"]
    bad_json = service.post("/v1/images/generations", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"


def _assert_guarded(response):
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_serve_gateway_keeps_the_services_same_machine_rules_without_a_key(service):
    body = b'{"prompt": "a red circle", "size": "64x64", "num_inference_steps": 1}'
    url = "/v1/images/generations"
    refusals = [  # each what a web page elsewhere could send: nothing reaches the routes
        (service.post(url, content=body, headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        (service.post(url, content=body, headers={"content-type": "application/json", "host": "evil.test"}),
         421, "wrong_host"),
        (service.post(url, content=body, headers={"content-type": "application/json",
                                                  "origin": "http://evil.example"}), 403, "cross_origin"),
        (service.post(url, content=body, headers={"content-type": "application/json",
                                                  "sec-fetch-site": "cross-site"}), 403, "cross_origin"),
        (service.get("/healthz", headers={"host": "evil.test"}), 421, "wrong_host"),
    ]
    for response, status, code in refusals:
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
        _assert_guarded(response)
    made = service.post(url, content=body, headers={"content-type": "application/json"})
    assert made.status_code == 200, made.text
    assert Image.open(io.BytesIO(base64.b64decode(made.json()["data"][0]["b64_json"]))).size == (64, 64)
    _assert_guarded(made)
    own_name = service.get("/healthz", headers={"host": f"localhost:{service.base_url.port}"})
    assert own_name.status_code == 200 and own_name.headers["X-Frame-Options"] == "DENY"


def test_the_gateway_reads_the_proxys_host_from_serve(service):
    from ray import serve

    from pixart_sigma.integrations.ray.serve import proxy_host

    assert proxy_host() == "127.0.0.1"  # Serve's private reader still works with this Ray, in this driver ...
    # ... and in the Gateway replica, where it runs: without a key the gateway fails closed when it cannot read
    # the host (its __init__ raises, the deploy fails), so this keyless gateway serving at all, with the
    # loopback-only Host rule, proves the replica read 127.0.0.1 (the keyless tests above prove it too).
    assert serve.status().applications["pixart"].deployments["Gateway"].status == "HEALTHY"
    assert service.get("/healthz").status_code == 200
    assert service.get("/healthz", headers={"host": "evil.test"}).status_code == 421


def test_serve_refuses_compile_unless_the_app_allows_it(service):
    """The module's app is built without allow_compile: compile=true is refused before it reaches a replica."""
    response = _post(service, prompt="a red circle", size="64x64", num_inference_steps=1, compile=True)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_settings", "compile")
    assert list(error["fields"]) == ["compile"]
    # The shared validator words the remedy from the gateway's set_by: this app's argument, not the service's flag.
    assert "compile=true is not allowed" in error["message"], error["message"]
    assert "serve run pixart_sigma.integrations.ray:app allow_compile=" in error["message"], error["message"]
    assert "--allow-compile" not in error["message"]
    made = _post(service, prompt="a red circle", size="64x64", num_inference_steps=1, compile=False)
    assert made.status_code == 200, made.text


def _crowd(service, count, steps):
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda k: _post(service, prompt=f"a red circle {k}", num_inference_steps=steps,
                                             seed=k), range(count)))


def test_serve_overload_is_429_with_retry_after_in_openais_shape(service):
    responses = _crowd(service, 8, 40)  # one runs, two wait, the rest are turned away at once
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 3, statuses
    refused = next(response for response in responses if response.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.json()["error"]["code"] == "queue_full"


def test_serve_replica_killed_under_load_fails_clearly_and_is_replaced(service):
    from ray import serve

    names = [actor for actor in ray.util.list_named_actors(all_namespaces=True) if "#Generator#" in actor["name"]]
    assert len(names) == 1
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # 200 steps (the most): about 2 s each on the CPU in bfloat16, so the first is still generating at the
        # kill (60 steps took 0.7 s: it finished before the kill and nothing was in flight). Two requests: a third
        # would find the queue (max_queued_requests=2, the one being routed counts) full.
        waiting = [pool.submit(_post, service, prompt=f"a blue square {k}", num_inference_steps=200, seed=k)
                   for k in range(2)]
        time.sleep(1.0)  # the first is generating, the other waits in the queue
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
        responses = [future.result(timeout=120) for future in waiting]  # nothing hangs
    for response in responses:
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "replica_died" and response.headers["Retry-After"]
    assert any(response.status_code == 503 for response in responses)  # the one in flight
    fresh = wait_until(lambda: (r := _post(service, prompt="a red circle", num_inference_steps=1, seed=1))
                       .status_code == 200 and r, timeout=90, interval=0.5)
    assert fresh.json()["data"][0]["seed"] == 1
    status = serve.status().applications["pixart"].deployments["Generator"]
    assert status.status == "HEALTHY"


def test_serve_with_an_api_key_needs_it_except_on_healthz(service):
    """Last of the Serve tests: it redeploys the module's app with a key."""
    from ray import serve

    from pixart_sigma.integrations.ray import app

    serve.run(app({"model_name": "demo", "device": "cpu", "api_key": "s3cret-key"}), name="pixart", route_prefix="/")
    body = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 1}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-key"}):
        refused = service.post("/v1/images/generations", json=body, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        _assert_guarded(refused)
    made = service.post("/v1/images/generations", json=body, headers={"authorization": "Bearer s3cret-key"})
    assert made.status_code == 200 and made.json()["data"][0]["b64_json"], made.text
    _assert_guarded(made)
    assert service.get("/healthz").json() == {"status": "ok"}  # open without the key
    # With a key the gateway may serve any name (a load balancer's, the node's).
    assert service.get("/v1/schema", headers={"host": "pixart.example", "authorization": "Bearer s3cret-key"}
                       ).status_code == 200


# -- without Ray ----------------------------------------------------------------------------------

def test_health_check_fails_when_the_model_cannot_generate(monkeypatch):
    import asyncio

    from pixart_sigma.integrations.ray.serve import Generator

    generator = Generator({"model_name": "demo", "device": "cpu"})
    asyncio.run(generator.check_health())  # just proven by its warm-up
    real = generator.model.generate

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    monkeypatch.setattr(generator.model, "generate", broken)
    with pytest.raises(RuntimeError):
        generator._generate("a red circle", {"seed": 1}, threading.Event())
    with pytest.raises(RuntimeError, match="the model cannot generate: RuntimeError: CUDA error"):
        asyncio.run(generator.check_health())
    monkeypatch.setattr(generator.model, "generate", real)
    asyncio.run(generator.check_health())  # recovered: proven again


def test_serve_builder_refuses_bad_arguments_naming_each():
    from pixart_sigma.integrations.ray.serve import options

    with pytest.raises(ValueError) as error:
        options({"model_name": "nope", "replicas": "two", "min_replicas": "3", "max_replicas": "2",
                 "max_queued_requests": "0", "device": "x" * 300, "colour": "red"})
    message = str(error.value)
    for expected in ("colour: not an argument", "model_name='nope'", "replicas='two' is not valid",
                     "min_replicas=3 is more than max_replicas=2", "max_queued_requests='0' is not valid",
                     "replicas and min_replicas/max_replicas exclude each other", "device is 300 characters"):
        assert expected in message, message
    found = options({"model_name": "demo", "min_replicas": "0", "max_replicas": "4", "device": "cpu"})
    assert (found["autoscale"], found["min_replicas"], found["max_replicas"], found["num_gpus"]) == (True, 0, 4, 0)


def test_serve_builder_takes_the_api_key_from_its_argument_or_the_services_variable(monkeypatch):
    from pixart_sigma.integrations.ray.serve import options
    from pixart_sigma.server import API_KEY_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert options({"model_name": "demo"})["api_key"] is None
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    assert options({"model_name": "demo"})["api_key"] == "from-the-environment"
    assert options({"model_name": "demo", "api_key": "from-the-argument"})["api_key"] == "from-the-argument"
    for bad in ("", " padded", "two\nlines", 12345, None):
        with pytest.raises(ValueError, match="api_key is not valid: it must be a non-empty string") as error:
            options({"model_name": "demo", "api_key": bad})
        assert "padded" not in str(error.value) and "lines" not in str(error.value)  # a secret is never shown
    monkeypatch.setenv(API_KEY_ENV, "tab\tkey")
    with pytest.raises(ValueError, match=f"{API_KEY_ENV} is not valid"):
        options({"model_name": "demo"})


def test_gateway_rules_are_the_services():
    from pixart_sigma.integrations.ray.serve import gateway_rules

    loopback = ("127.0.0.1", "localhost", "[::1]")
    assert gateway_rules(None, "127.0.0.1") == gateway_rules(None, "::1") == (None, loopback)
    # With a key: any Host, the key checked instead, whatever the proxy binds (known or not).
    assert gateway_rules("key", "0.0.0.0") == gateway_rules("key", None) == ("key", None)
    with pytest.raises(SettingsError, match="host='0.0.0.0', reachable from other machines: set an API key with "
                                            "the api_key argument or PIXART_SIGMA_API_KEY"):
        gateway_rules(None, "0.0.0.0")
    # Unknown (None), without a key: refused. A remote client of a proxy on 0.0.0.0 can send Host: 127.0.0.1.
    with pytest.raises(SettingsError) as error:
        gateway_rules(None, None, "reading it failed: RuntimeError: no controller")
    message = str(error.value)
    for expected in ("Serve's HTTP proxy host is unknown (reading it failed: RuntimeError: no controller)",
                     "refuses to start", "set an API key with the api_key argument or PIXART_SIGMA_API_KEY",
                     "make sure Serve's http_options host is readable"):
        assert expected in message, message
    with pytest.raises(SettingsError, match=r"host is unknown \(it could not be read\)"):
        gateway_rules(None, None)


def _gateway(*args, **kwargs):
    """The Gateway as its replica constructs it, outside Serve (the class under serve.ingress's async wrapper)."""
    from pixart_sigma.integrations.ray.serve import Gateway

    cls = Gateway.__bases__[0]
    gateway = cls.__new__(cls)
    cls.__init__(gateway, *args, **kwargs)
    return gateway


def test_the_gateway_fails_closed_when_it_cannot_read_the_proxys_host(monkeypatch):
    import ray.serve.context

    from pixart_sigma.integrations.ray.serve import Guards, proxy_host, read_proxy_host

    def unreadable(*args, **kwargs):
        raise RuntimeError("no Serve controller (injected)")

    monkeypatch.setattr(Guards, "rules", None)
    monkeypatch.setattr(ray.serve.context, "_get_global_client", unreadable)
    assert proxy_host() is None
    assert read_proxy_host() == (None, "reading it failed: RuntimeError: no Serve controller (injected)")
    load = {"model_name": "demo"}
    with pytest.raises(SettingsError, match=r"host is unknown \(reading it failed: RuntimeError: no Serve controller"):
        _gateway(None, load, 1, 300.0)
    assert Guards.rules is None  # still refusing every request (503)
    _gateway(None, load, 1, 300.0, api_key="k3y")
    assert Guards.rules == ("k3y", None)  # with a key the host is not needed

    class NoProxy:  # http_options host None: Serve starts no HTTP proxy; unknown all the same
        class http_config:
            host = None

    monkeypatch.setattr(Guards, "rules", None)
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda *args, **kwargs: NoProxy)
    assert read_proxy_host() == (None, "Serve's http_options host is None")
    with pytest.raises(SettingsError, match="host is unknown"):
        _gateway(None, load, 1, 300.0)
    assert Guards.rules is None


def test_serve_builder_parses_allow_compile_as_true_or_false():
    from pixart_sigma.integrations.ray.serve import options

    assert options({"model_name": "demo"})["allow_compile"] is False
    for value, expected in ((True, True), (False, False), ("true", True), ("false", False), ("True", True),
                            (" FALSE ", False)):
        assert options({"model_name": "demo", "allow_compile": value})["allow_compile"] is expected, value
    for bad in ("yes", "no", "1", "0", "", "on", 1, 0, None, ["true"]):
        with pytest.raises(ValueError) as error:
            options({"model_name": "demo", "allow_compile": bad})
        assert f"allow_compile={bad!r} is not valid: it must be true or false" in str(error.value)


def test_the_apps_allow_compile_reaches_the_gateways_checks(monkeypatch):
    import ray.serve.context

    from pixart_sigma.integrations.ray import app
    from pixart_sigma.integrations.ray.serve import Guards

    class Local:
        class http_config:
            host = "127.0.0.1"

    monkeypatch.delenv("PIXART_SIGMA_API_KEY", raising=False)  # keyless: the host is read, as in a replica
    monkeypatch.setattr(Guards, "rules", None)
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda *args, **kwargs: Local)
    body = {"prompt": "a red circle", "compile": True}
    for value, allowed in (("true", True), ("false", False), (None, False)):
        args = {"model_name": "demo", "device": "cpu", **({"allow_compile": value} if value else {})}
        bound = app(args)._bound_deployment  # what Serve will construct the Gateway replica with
        gateway = _gateway(*bound.init_args, **bound.init_kwargs)
        assert gateway.catalog.allow_compile is allowed
        if allowed:
            assert gateway.catalog.validate(body)[2]["compile"] is True
        else:
            with pytest.raises(SettingsError) as error:
                gateway.catalog.validate(body)
            assert list(error.value.by_field()) == ["compile"]


def test_gateway_middleware_refuses_everything_until_a_gateway_configures_it(monkeypatch):
    import asyncio

    from pixart_sigma.integrations.ray.serve import Guards, api

    async def call(*requests):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return [await client.request(method, path, headers=headers) for method, path, headers in requests]

    monkeypatch.setattr(Guards, "rules", None)
    [unconfigured] = asyncio.run(call(("GET", "/nowhere", {})))
    assert unconfigured.status_code == 503 and unconfigured.json()["error"]["code"] == "not_configured"
    _assert_guarded(unconfigured)
    monkeypatch.setattr(Guards, "rules", ("k3y", None))  # as Gateway.__init__ sets them with a key
    without, keyed = asyncio.run(call(("GET", "/nowhere", {}), ("GET", "/nowhere", {"authorization": "Bearer k3y"})))
    assert without.status_code == 401 and keyed.status_code == 404  # past the key: the app's own 404
