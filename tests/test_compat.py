"""The compatibility routes, against real server processes and real clients.

OpenAI's Images API is driven with the `openai` package itself; A1111's txt2img with httpx. Every
request becomes a job in the same queue as POST /v1/generations, so the same settings make the same
pixels, and the job history shows each request once (no hidden retries).
"""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from pixart_sigma import read_settings
from pixart_sigma.server.store import JobStore
from serving import start_server, wait_for_job

STEPS = {"num_inference_steps": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("compat") / "data", faults=True)
    yield server
    server.stop()


def oai(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", **{"max_retries": 2, "timeout": 60, **kwargs})


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def job_total(http) -> int:
    return http.get("/v1/jobs", params={"limit": 1}).json()["total"]


def in_thread(function, *args, **kwargs):
    """Run a blocking call in a thread; returns (thread, box) where box holds "result" or "error"."""
    box: dict = {}

    def run():
        try:
            box["result"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def running_job(http, prompt: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in http.get("/v1/jobs").json()["jobs"]:
            if job["prompt"] == prompt and job["status"] == "running" and job["progress"]["step"] >= 1:
                return job
        time.sleep(0.05)
    raise TimeoutError(f"no running job for {prompt!r}")


# -- OpenAI ----------------------------------------------------------------------------------------

def test_openai_b64_images_carry_their_seeds(server):
    result = oai(server).images.generate(prompt="a red circle", n=2, size="64x64", response_format="b64_json",
                                         extra_body={"seed": 3, **STEPS})
    assert isinstance(result.created, int) and len(result.data) == 2
    seeds = []
    for item in result.data:
        assert item.url is None and item.revised_prompt == "a red circle"
        image = png(base64.b64decode(item.b64_json))
        assert image.size == (64, 64)
        record = read_settings(image)
        assert record["prompt"] == "a red circle" and record["num_inference_steps"] == 4
        seeds.append(record["seed"])
    assert seeds == [3, 4]
    extra = result.model_extra or {}
    assert extra.get("model") == "demo" and len(extra.get("job_id", "")) == 32


def test_openai_url_points_at_the_png(server, http):
    # dall-e-3 is OpenAI's name: it means the default served model (see compat.OPENAI_MODEL_PREFIXES)
    result = oai(server).images.generate(prompt="a blue square", model="dall-e-3", size="auto", response_format="url",
                                         quality="hd", style="vivid", user="someone", extra_body={"seed": 5, **STEPS})
    (item,) = result.data
    assert item.b64_json is None and item.url.startswith(server.url + "/v1/images/")
    fetched = httpx.get(item.url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    image = png(fetched.content)
    assert image.size == (64, 64) and read_settings(image)["seed"] == 5
    job = http.get(f"/v1/jobs/{result.model_extra['job_id']}").json()
    assert job["status"] == "succeeded" and job["model_name"] == "demo"


def test_openai_same_pixels_as_generations(server, http):
    settings = {"seed": 11, "num_inference_steps": 4, "guidance_scale": 3.0, "negative_prompt": "blur"}
    queued = http.post("/v1/generations", json={"prompt": "two green triangles", "width": 64, "height": 64,
                                                **settings})
    assert queued.status_code == 202
    job = wait_for_job(http, queued.json()["id"])
    ours = png(http.get(job["images"][0]["url"]).content)
    result = oai(server).images.generate(prompt="two green triangles", size="64x64", response_format="b64_json",
                                         extra_body=settings)
    theirs = png(base64.b64decode(result.data[0].b64_json))
    assert result.model_extra["job_id"] != job["id"]
    assert theirs.convert("RGB").tobytes() == ours.convert("RGB").tobytes()


def test_openai_bad_input_is_400_in_openai_shape_with_our_messages(server, http):
    client = oai(server, max_retries=0)
    before = job_total(http)
    cases = [
        ({"size": "65x64"}, "size", ["size='65x64'", "width=65", "multiple of 8", "64 or 72"]),
        ({"size": "big"}, "size", ["size='big'", "WIDTHxHEIGHT", "'auto'", "64x64"]),
        ({"n": 11}, "n", ["n=11", "from 1 to 10"]),
        ({"model": "flux-dev"}, "model", ["model='flux-dev'", "demo"]),
        ({"output_format": "jpeg"}, "output_format", ["png"]),
        ({"background": "transparent"}, "background", ["opaque"]),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps", ["num_inference_steps=0", "from 1 to 200"]),
        ({"extra_body": {"colour": "red"}}, "colour", ["unknown setting 'colour'"]),
    ]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a circle", **kwargs)
        error = caught.value
        assert error.status_code == 400, kwargs
        body = error.body  # the "error" object
        assert body["param"] == param and body["type"] == "invalid_request_error", (kwargs, body)
        for word in words:
            assert word in body["message"], (kwargs, body["message"])
        assert error.response.headers["x-should-retry"] == "false"
    # every problem at once, each named in the client's words
    response = http.post("/v1/images/generations", json={"prompt": "", "n": 0, "size": "64x9999"})
    assert response.status_code == 400
    fields = response.json()["error"]["fields"]
    assert {"prompt", "n", "size"} <= set(fields), fields
    assert job_total(http) == before


def test_openai_idempotency_key_returns_the_same_job(server, http):
    client = oai(server)
    headers = {"Idempotency-Key": f"compat-{time.time_ns()}"}
    before = job_total(http)
    first = client.images.generate(prompt="a yellow star", response_format="b64_json", extra_headers=headers,
                                   extra_body={"seed": 8, **STEPS})
    again = client.images.with_raw_response.generate(prompt="a yellow star", response_format="b64_json",
                                                     extra_headers=headers, extra_body={"seed": 8, **STEPS})
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.parse().model_extra["job_id"] == first.model_extra["job_id"]
    assert again.parse().data[0].b64_json == first.data[0].b64_json
    assert job_total(http) == before + 1


def test_openai_out_of_memory_is_500_and_not_retried(server, http):
    before = job_total(http)
    with pytest.raises(openai.InternalServerError) as caught:
        oai(server, max_retries=2).images.generate(prompt="a huge [oom] scene", extra_body=STEPS)
    error = caught.value
    assert error.status_code == 500 and error.response.headers["x-should-retry"] == "false"
    assert error.body["type"] == "server_error" and error.body["code"] == "out_of_memory"
    assert "out of memory" in error.body["message"]
    assert job_total(http) == before + 1  # the client did not retry a job that would fail again


def test_openai_cancelled_job_is_an_error(server, http):
    prompt = "a slow [slow] moon, cancelled"
    thread, box = in_thread(oai(server).images.generate, prompt=prompt, extra_body={"num_inference_steps": 100})
    job = running_job(http, prompt)
    assert http.delete(f"/v1/jobs/{job['id']}").status_code == 202
    thread.join(30)
    error = box.get("error")
    assert isinstance(error, openai.ConflictError), box
    assert error.body["code"] == "job_cancelled" and job["id"] in error.body["message"]
    assert [j["prompt"] for j in http.get("/v1/jobs").json()["jobs"]].count(prompt) == 1  # not retried


def test_openai_gpt_image_names_answer_b64_by_default(server):
    result = oai(server).images.generate(prompt="a white dot", model="gpt-image-1", extra_body={"seed": 1, **STEPS})
    assert result.data[0].url is None and read_settings(png(base64.b64decode(result.data[0].b64_json)))["seed"] == 1


def test_openai_client_that_gives_up_leaves_the_job_running(server, http):
    prompt = "a slow [slow] cloud, abandoned"
    with pytest.raises(openai.APITimeoutError):
        oai(server, max_retries=0, timeout=1.0).images.generate(prompt=prompt, extra_body={"num_inference_steps": 10})
    (job,) = [job for job in http.get("/v1/jobs").json()["jobs"] if job["prompt"] == prompt]
    assert wait_for_job(http, job["id"], timeout=30)["status"] == "succeeded"  # still in the history, with its images


# -- A1111 -----------------------------------------------------------------------------------------

def test_txt2img_images_and_info(server, http):
    response = http.post("/sdapi/v1/txt2img", json={
        "prompt": "a purple circle", "negative_prompt": "noise", "seed": 21, "steps": 4, "cfg_scale": 5,
        "width": 64, "height": 64, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 2,
        "enable_hr": False, "restore_faces": False, "denoising_strength": 0, "save_images": True,
        "override_settings": {"sd_model_checkpoint": "demo"}})
    assert response.status_code == 200, response.text
    body = response.json()
    images = [png(base64.b64decode(data)) for data in body["images"]]
    assert len(images) == 4 and all(image.size == (64, 64) for image in images)
    info = json.loads(body["info"])
    assert info["seed"] == 21 and info["all_seeds"] == [21, 22, 23, 24]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 4 and info["cfg_scale"] == 5
    assert info["interrupted"] is False and len(info["job_ids"]) == 2
    for image, text, seed in zip(images, info["infotexts"], info["all_seeds"]):
        assert text == image.info["parameters"]
        assert f"Seed: {seed}," in text and "Sampler: Euler a" in text and "Negative prompt: noise" in text
        assert read_settings(image)["seed"] == seed
    assert body["parameters"]["sampler_name"] == "Euler a" and body["parameters"]["n_iter"] == 2
    jobs = [http.get(f"/v1/jobs/{job_id}").json() for job_id in info["job_ids"]]
    assert [job["settings"]["scheduler"] for job in jobs] == ["euler-ancestral"] * 2
    assert [job["seeds"] for job in jobs] == [[21, 22], [23, 24]]


def test_txt2img_random_seed_is_recorded(http):
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "an orange ring", "seed": -1, "steps": 3,
                                                     "sampler_name": "euler"})
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"]]
    assert body["parameters"]["seed"] == -1
    image = png(base64.b64decode(body["images"][0]))
    assert read_settings(image)["seed"] == info["seed"] and f"Seed: {info['seed']}," in info["infotexts"][0]


def test_txt2img_refusals_name_the_a1111_fields(http):
    before = job_total(http)
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "DPM++ 2M Karras"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "sampler_name"
    for name in ("DPM++ 2M", "Euler a", "DDIM", "UniPC", "dpm-solver++"):
        assert name in error["message"]
    assert response.json()["detail"] == error["message"]

    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0, "cfg_scale": 99, "batch_size": 17,
                                                     "enable_hr": True, "width": 70})
    assert response.status_code == 422
    fields = response.json()["error"]["fields"]
    assert set(fields) == {"steps", "cfg_scale", "batch_size", "enable_hr", "width"}, fields
    assert fields["steps"][0].startswith("steps=0 is not valid")
    assert fields["cfg_scale"][0].startswith("cfg_scale=99 is not valid")
    assert "num_inference_steps" not in response.text and "guidance_scale" not in response.text

    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "scheduler": "Karras"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "scheduler"

    # A1111's name and ours for one setting: the same value twice is fine (checked by the job queue's count
    # below only for the refusals), different values are refused.
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 3, "num_inference_steps": 4,
                                                     "override_settings": {"sd_model_checkpoint": "demo"},
                                                     "model_name": "not-demo"})
    assert response.status_code == 422
    fields = response.json()["error"]["fields"]
    assert "steps and num_inference_steps are the same setting with different values" in fields["steps"][0]
    assert "override_settings" in fields
    assert job_total(http) == before


def test_txt2img_seed_too_large_for_its_batches_names_the_batch_and_the_largest_seed(http):
    from pixart_sigma.settings import MAX_SEED

    before = job_total(http)
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": MAX_SEED, "n_iter": 2})
    assert response.status_code == 422
    message = response.json()["error"]["fields"]["seed"][0]
    assert f"seed={MAX_SEED} is too large for n_iter=2 batches of 1" in message
    assert f"would use seed {MAX_SEED + 1}" in message and f"use a seed up to {MAX_SEED - 1}" in message
    assert job_total(http) == before
    ok = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": MAX_SEED - 1, "n_iter": 2})
    assert ok.status_code == 200 and json.loads(ok.json()["info"])["all_seeds"] == [MAX_SEED - 1, MAX_SEED]


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None, []])
def test_txt2img_send_images_must_be_a_boolean(http, value):
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "send_images": value})
    if value is None:  # null: left out
        assert response.status_code == 200 and len(response.json()["images"]) == 1
        return
    assert response.status_code == 422 and "send_images" in response.json()["error"]["fields"]
    assert "true or false" in response.json()["detail"]


def test_txt2img_send_images_false_sends_none(http):
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "send_images": False})
    assert response.status_code == 200 and response.json()["images"] == []
    assert len(json.loads(response.json()["info"])["infotexts"]) == 1


@pytest.mark.parametrize("size", ["64x64\n", "64x64 ", " 64x64", "64x64\n\n", "64X64"])
def test_openai_size_with_anything_around_it_is_refused(http, size):
    response = http.post("/v1/images/generations", json={"prompt": "x", "size": size, "num_inference_steps": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"


def test_progress_and_interrupt(server, http):
    idle = http.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["current_image"] is None
    prompt = "a slow [slow] comet"
    thread, box = in_thread(http.post, "/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 100, "n_iter": 2})
    job = running_job(http, prompt)
    progress = http.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    state = progress["state"]
    assert state["job"] == job["id"] and state["sampling_steps"] == 100 and 1 <= state["sampling_step"] < 100
    assert state["job_count"] == 2 and state["job_no"] == 0 and state["interrupted"] is False
    assert http.post("/sdapi/v1/interrupt").json() == {"interrupted": job["id"]}
    thread.join(30)
    response = box["result"]
    # Interrupted: 200 with the partial state, as A1111 answers (no batch finished, so no images).
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert body["images"] == [] and info["interrupted"] is True and "interrupted in batch 1 of 2" in info["error"]
    statuses = [wait_for_job(http, job_id, timeout=30)["status"] for job_id in info["job_ids"]]
    assert statuses == ["cancelled", "cancelled"]  # the second batch is cancelled with the first
    assert http.get("/sdapi/v1/progress").json()["state"]["job"] == ""


def test_samplers_and_models(http):
    samplers = http.get("/sdapi/v1/samplers").json()
    assert {"name": "DPM++ 2M", "aliases": ["dpm-solver++"], "options": {}} in samplers
    assert [model["title"] for model in http.get("/sdapi/v1/sd-models").json()] == ["demo"]


# -- both ------------------------------------------------------------------------------------------

def test_openapi_lists_both_families_with_request_schemas(http):
    paths = http.get("/openapi.json").json()["paths"]
    for path, names in (("/v1/images/generations", ("prompt", "n", "size", "response_format", "seed")),
                        ("/sdapi/v1/txt2img", ("prompt", "steps", "cfg_scale", "sampler_name", "batch_size"))):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(names) <= set(schema["properties"]), path
    assert "get" in paths["/sdapi/v1/progress"] and "post" in paths["/sdapi/v1/interrupt"]


def test_bodies_over_one_mebibyte_are_413(http):
    big = json.dumps({"prompt": "x" * (1 << 20)})
    for path in ("/v1/images/generations", "/sdapi/v1/txt2img"):
        response = http.post(path, content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_queue_full_429_then_drain_503(tmp_path):
    """A server with a queue of one: full -> 429 with Retry-After (honoured by the client), then a drain."""
    server = start_server(tmp_path / "data", "--model-name", "demo", "--queue-size", "1", faults=True)
    try:
        with server.client() as http:
            running = http.post("/v1/generations", json={"prompt": "[slow] first", "num_inference_steps": 200}).json()
            waiting = http.post("/v1/generations", json={"prompt": "[slow] second", "num_inference_steps": 5}).json()
            with pytest.raises(openai.RateLimitError) as caught:
                oai(server, max_retries=0).images.generate(prompt="a third")
            error = caught.value
            retry_after = int(error.response.headers["retry-after"])
            assert 1 <= retry_after <= 10
            assert error.body["type"] == "rate_limit_error" and error.body["code"] == "queue_full"
            # with retries, the client waits Retry-After between tries, then gives up (the queue is still full)
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError):
                oai(server, max_retries=2).images.generate(prompt="a third")
            assert 2 * retry_after <= time.monotonic() - started < 2 * retry_after + 15
            assert http.get("/v1/jobs").json()["total"] == 2
            # a request waiting on a queued job when the drain starts: 503, and the job is kept
            http.delete(f"/v1/jobs/{waiting['id']}")
            http.delete(f"/v1/jobs/{running['id']}")
            wait_for_job(http, running["id"], timeout=30)
            blocker = http.post("/v1/generations", json={"prompt": "[slow] blocker", "num_inference_steps": 15}).json()
            thread, box = in_thread(oai(server, max_retries=0).images.generate, prompt="after the drain",
                                    extra_body=STEPS)
            deadline = time.monotonic() + 30
            while http.get("/v1/jobs").json()["total"] < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            queued = http.get("/v1/jobs").json()["jobs"][0]
            assert queued["prompt"] == "after the drain" and queued["status"] == "queued"
            server.process.send_signal(signal.SIGTERM)
            thread.join(30)
            error = box.get("error")
            assert isinstance(error, openai.APIStatusError) and error.status_code == 503, box
            assert queued["id"] in error.body["message"] and error.response.headers["retry-after"] == "5"
        assert server.process.wait(60) == 0
        store = JobStore(server.data_dir)
        try:
            assert store.get(queued["id"]).status == "queued"  # runs after the next start
            assert store.get(blocker["id"]).status == "succeeded"  # the running job finished
        finally:
            store.close()
    finally:
        server.stop()
