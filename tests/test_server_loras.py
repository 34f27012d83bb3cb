"""LoRAs through the service (issue 25): `serve --lora-dir`, the listing routes, A1111's <lora:NAME:SCALE> prompt
tags on txt2img and img2img, OpenAI's extra_body on images.generate and images.edit (the `openai` client itself),
and the job route, against a real server process on the demo model with LoRAs written for its transformer.

What a client sees: status codes, error text naming the field or tag, the rule and what the folder holds, the job's
and the image's recorded LoRAs, and pixels (a LoRA changes them; scale 0 gives the base byte for byte). The server's
own folder never shows in an answer.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
import signal

import numpy as np
import openai
import pytest
from PIL import Image

from pixart_sigma import read_settings
from serving import start_server, wait_for_job, wait_until, write_demo_lora

PROMPT = "a red circle on a blue background"
FAST = {"num_inference_steps": 3, "seed": 11, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "loras"
    write_demo_lora(folder / "style.safetensors", 1, metadata={"ss_output_name": "style", "ss_network_dim": "4",
                                                               "ss_tag_frequency": '{"shapes": {"circle": 3}}'})
    write_demo_lora(folder / "other.safetensors", 2, layout="diffusers")
    write_demo_lora(folder / "kinds" / "peft-one", 3, layout="peft")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, folder):
    server = start_server(tmp_path_factory.mktemp("loras") / "data", "--model-name", "demo", "--lora-dir", str(folder))
    yield server
    server.stop()


def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def job_total(http) -> int:
    return http.get("/v1/jobs", params={"limit": 1}).json()["total"]


def run_job(http, body: dict) -> tuple[dict, np.ndarray, dict]:
    """(the finished job, its first image's pixels, that image's record) of a /v1/generations request."""
    response = http.post("/v1/generations", json={"prompt": PROMPT, **FAST, **body})
    assert response.status_code == 202, response.text
    job = wait_for_job(http, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job, *image_of(http.get(job["images"][0]["url"]).content)


def image_of(data: bytes) -> tuple[np.ndarray, dict]:
    image = Image.open(io.BytesIO(data))
    return np.asarray(image.convert("RGB")), read_settings(image)


def listed(http) -> dict[str, dict]:
    response = http.get("/v1/loras")
    assert response.status_code == 200, response.text
    return {lora["name"]: lora for lora in response.json()["loras"]}


def assert_private(response, folder) -> None:
    """No answer says where the LoRA folder is on the server."""
    assert str(folder) not in response.text and str(folder.resolve()) not in response.text, response.text


# -- the folder, listed ------------------------------------------------------------------------------------

def test_the_listing_shows_each_lora_and_why_one_cannot_be_used(http, folder):
    response = http.get("/v1/loras")
    assert_private(response, folder)
    loras = listed(http)
    assert set(loras) == {"style", "other", "peft-one", "broken"}
    style = loras["style"]
    assert (style["path"], style["layout"], style["ranks"], style["problem"]) == ("style.safetensors", "kohya", [4], None)
    assert style["targets"] > 0 and style["bytes"] == (folder / "style.safetensors").stat().st_size
    assert len(style["sha256"]) == 64 and style["short_hash"] == style["sha256"][:10]
    assert (loras["peft-one"]["path"], loras["peft-one"]["layout"]) == ("kinds/peft-one", "peft")
    broken = loras["broken"]
    assert "not a safetensors file" in broken["problem"] and broken["sha256"] == "" and broken["layout"] == ""
    assert broken["problem"].startswith("broken.safetensors")  # named inside the folder, not by the server's path


def test_a1111_lists_the_usable_loras_and_refreshes(http, folder):
    response = http.get("/sdapi/v1/loras")
    assert response.status_code == 200
    assert_private(response, folder)
    loras = {lora["name"]: lora for lora in response.json()}
    assert set(loras) == {"style", "other", "peft-one"}  # broken.safetensors cannot be used: GET /v1/loras says why
    assert loras["style"]["alias"] == "style" and loras["style"]["path"] == "style.safetensors"
    assert loras["style"]["metadata"]["ss_network_dim"] == "4"
    assert loras["style"]["metadata"]["ss_tag_frequency"] == {"shapes": {"circle": 3}}  # JSON decoded, as A1111's
    added = write_demo_lora(folder / "late.safetensors", 9)
    try:
        refreshed = http.post("/sdapi/v1/refresh-loras")
        assert refreshed.status_code == 200 and refreshed.json() is None
        assert "late" in {lora["name"] for lora in http.get("/sdapi/v1/loras").json()}
        added.unlink()
        assert "late" not in {lora["name"] for lora in http.get("/sdapi/v1/loras").json()}  # a change is seen
    finally:
        added.unlink(missing_ok=True)


# -- the job route -----------------------------------------------------------------------------------------

def test_a_lora_changes_the_pixels_scale_0_is_the_base_and_both_are_recorded(http):
    sha = listed(http)["style"]["sha256"]
    base_job, base, base_record = run_job(http, {})
    styled_job, styled, record = run_job(http, {"loras": [{"name": "style", "scale": 1.0}]})
    zero_job, zero, zero_record = run_job(http, {"loras": [{"name": "style", "scale": 0}]})
    assert styled_job["settings"]["loras"] == [{"name": "style", "scale": 1.0}]
    assert record["loras"] == [{"name": "style", "scale": 1.0, "sha256": sha}]
    assert "loras" not in base_record and base_job["settings"]["loras"] == []
    assert not np.array_equal(styled, base)
    assert np.array_equal(zero, base)  # scale 0 applies nothing: the base, byte for byte
    assert zero_record["loras"] == [{"name": "style", "scale": 0.0, "sha256": sha}]
    _, again, _ = run_job(http, {})
    assert np.array_equal(again, base)  # the LoRA came off again


def test_the_job_route_refuses_a_name_the_folder_lacks_or_a_path_saying_what_it_holds(http, folder):
    before = job_total(http)
    response = http.post("/v1/generations", json={"prompt": PROMPT, "loras": [
        {"name": "style"}, {"name": "missing", "scale": 0.5}, {"name": str(folder / "style.safetensors")},
        {"name": "../style"}, {"name": "style", "scale": 9}]})
    assert response.status_code == 422
    assert_private(response, folder)
    error = response.json()["error"]
    assert error["param"] == "loras" and list(error["fields"]) == ["loras"]
    messages = error["fields"]["loras"]
    text = "\n".join(messages)
    assert "loras.1.name='missing' is not in this server's LoRA folder: this server's LoRAs are broken, other, " \
           "peft-one, style" in text
    assert "loras.2.name=" in text and "never a path" in text
    assert "loras.3.name='../style' is not valid here" in text
    assert "loras.4.scale=9 is not valid: it must be from -4.0 to 4.0" in text
    assert not any(message.startswith("loras.0.") for message in messages)
    assert len(messages) == 4  # each entry named once
    response = http.post("/v1/generations", json={"prompt": PROMPT, "loras": [{"name": "broken"}]})
    assert response.status_code == 422
    assert_private(response, folder)
    message = response.json()["error"]["message"]
    assert message.startswith("loras.0.name='broken' cannot be used: broken.safetensors is not a safetensors file")
    assert job_total(http) == before


# -- A1111 ---------------------------------------------------------------------------------------------------

def txt2img(http, prompt: str, **fields):
    return http.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": FAST["num_inference_steps"],
                                                "seed": FAST["seed"], "width": 64, "height": 64, **fields})


def test_txt2img_reads_lora_tags_out_of_the_prompt(http):
    sha = listed(http)["style"]["sha256"]
    response = txt2img(http, f"{PROMPT} <lora:style:0.8>")
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["prompt"] == f"{PROMPT} <lora:style:0.8>" and body["parameters"]["prompt"] == info["prompt"]
    assert info["extra_generation_params"]["Lora hashes"] == f"style: {sha[:10]}"
    job = http.get(f"/v1/jobs/{info['job_ids'][0]}").json()
    assert job["prompt"] == PROMPT  # what the model was given: no tag
    assert job["settings"]["loras"] == [{"name": "style", "scale": 0.8}]
    pixels, record = image_of(base64.b64decode(body["images"][0]))
    assert record["prompt"] == PROMPT and record["loras"] == [{"name": "style", "scale": 0.8, "sha256": sha}]
    text = info["infotexts"][0]
    assert text.startswith(f"{PROMPT} <lora:style:0.8>\n") and f"Lora hashes: \"style: {sha[:10]}\"" in text
    _, same, _ = run_job(http, {"loras": [{"name": "style", "scale": 0.8}]})
    assert np.array_equal(pixels, same)  # the same job as the job route's
    _, base, _ = run_job(http, {})
    assert not np.array_equal(pixels, base)


def test_txt2img_tags_follow_the_requests_own_loras_and_scale_defaults_to_1(http):
    response = txt2img(http, f"<lora:style> {PROMPT}, <LORA:peft-one:-0.5>",
                       loras=[{"name": "other", "scale": 0.25}])
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    job = http.get(f"/v1/jobs/{info['job_ids'][0]}").json()
    assert job["prompt"] == f"{PROMPT},"
    assert job["settings"]["loras"] == [{"name": "other", "scale": 0.25}, {"name": "style", "scale": 1.0},
                                        {"name": "peft-one", "scale": -0.5}]


@pytest.mark.parametrize("prompt, fields, words", [
    (f"{PROMPT} <lora:nowhere:0.8>", {}, ["prompt: the tag '<lora:nowhere:0.8>'", "name='nowhere' is not in this "
                                          "server's LoRA folder", "this server's LoRAs are broken, other, peft-one, "
                                          "style", "/sdapi/v1/loras"]),
    (f"{PROMPT} <lora:style:strong>", {}, ["the tag '<lora:style:strong>' has the scale 'strong', not a number",
                                           "<lora:NAME:SCALE>", "from -4 to 4"]),
    (f"{PROMPT} <lora:style:1:0.5>", {}, ["'<lora:style:1:0.5>' has 2 values after the name", "<lora:NAME:TE:UNET>",
                                          "write <lora:style:SCALE>"]),
    (f"{PROMPT} <lora:style:0.8", {}, ["'<lora:style:0.8', a LoRA tag without its closing '>'"]),
    (f"{PROMPT} <lora::0.8>", {}, ["the tag '<lora::0.8>' names no LoRA", "this server's LoRAs are"]),
    (f"{PROMPT} <lora:style:7>", {}, ["the tag '<lora:style:7>': scale=7.0 is not valid: it must be from -4.0 to 4.0"]),
    (f"{PROMPT} <lora:../style:1>", {}, ["the tag '<lora:../style:1>': name='../style' is not valid here",
                                         "never a path"]),
    ("<lora:style:1>", {}, ["prompt is empty", "its <lora:...> tags are taken out of it"]),
])
def test_txt2img_refuses_a_bad_tag_naming_it_the_rule_and_the_folder(http, folder, prompt, fields, words):
    before = job_total(http)
    response = txt2img(http, prompt, **fields)
    assert response.status_code == 422, response.text
    assert_private(response, folder)
    error = response.json()["error"]
    assert error["param"] == "prompt", error
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert response.json()["detail"] == error["message"]
    assert job_total(http) == before


def test_txt2img_refuses_a_lora_tag_in_the_negative_prompt_and_too_many_loras_counts_the_tags(http):
    response = txt2img(http, PROMPT, negative_prompt="blurry <lora:style:1>")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "negative_prompt"
    assert "negative_prompt holds the LoRA tag '<lora:style:1>': LoRA tags are read from prompt only" in error["message"]
    response = txt2img(http, PROMPT + " <lora:style:0.1>" * 7, loras=[{"name": "other"}] * 2)
    assert response.status_code == 422
    assert "loras has 9 LoRAs: at most 8 are applied in one call (7 from <lora:...> tags in prompt, 2 sent as " \
           "loras)" in response.json()["error"]["message"]


def test_img2img_reads_tags_too(http):
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture, "PNG")
    response = http.post("/sdapi/v1/img2img", json={
        "prompt": f"{PROMPT} <lora:other:0.5>", "init_images": [base64.b64encode(picture.getvalue()).decode()],
        "denoising_strength": 0.6, "steps": 3, "seed": 2})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    job = http.get(f"/v1/jobs/{info['job_ids'][0]}").json()
    assert job["prompt"] == PROMPT and job["settings"]["loras"] == [{"name": "other", "scale": 0.5}]
    assert "<lora:other:0.5>" in info["infotexts"][0]
    bad = http.post("/sdapi/v1/img2img", json={
        "prompt": f"{PROMPT} <lora:gone>", "init_images": [base64.b64encode(picture.getvalue()).decode()]})
    assert bad.status_code == 422 and "the tag '<lora:gone>'" in bad.json()["detail"]


# -- OpenAI --------------------------------------------------------------------------------------------------

def test_openai_generate_applies_extra_body_loras(server, http, folder):
    sha = listed(http)["other"]["sha256"]
    result = oai(server).images.generate(prompt=PROMPT, size="64x64", response_format="b64_json",
                                         extra_body={"seed": FAST["seed"], "num_inference_steps": 3,
                                                     "loras": [{"name": "other", "scale": 0.7}]})
    pixels, record = image_of(base64.b64decode(result.data[0].b64_json))
    assert record["loras"] == [{"name": "other", "scale": 0.7, "sha256": sha}]
    _, same, _ = run_job(http, {"loras": [{"name": "other", "scale": 0.7}]})
    assert np.array_equal(pixels, same)
    with pytest.raises(openai.BadRequestError) as caught:
        oai(server).images.generate(prompt=PROMPT, extra_body={"loras": [{"name": "other"}, {"name": "nope"}]})
    error = caught.value
    assert error.status_code == 400 and error.body["param"] == "loras" and error.body["type"] == "invalid_request_error"
    assert "loras.1.name='nope' is not in this server's LoRA folder: this server's LoRAs are" in error.body["message"]
    assert str(folder) not in error.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        oai(server).images.generate(prompt=PROMPT, extra_body={"loras": [{"name": "/etc/passwd"}]})
    assert "never a path" in caught.value.body["message"]


def test_openai_edit_applies_extra_body_loras_sent_as_form_fields(server, http):
    source = Image.new("RGBA", (64, 64), (200, 40, 40, 255))
    source.paste((0, 0, 0, 0), (32, 0, 64, 64))
    picture = io.BytesIO()
    source.save(picture, "PNG")
    result = oai(server).images.edit(
        image=("a.png", picture.getvalue(), "image/png"), prompt=PROMPT, response_format="b64_json",
        extra_body={"seed": 4, "num_inference_steps": 3,
                    "loras": [{"name": "style", "scale": 0.5}, {"name": "other", "scale": -1}]})
    _, record = image_of(base64.b64decode(result.data[0].b64_json))
    assert [(lora["name"], lora["scale"]) for lora in record["loras"]] == [("style", 0.5), ("other", -1.0)]
    with pytest.raises(openai.BadRequestError) as caught:  # a scale for one LoRA but not the other: which is whose?
        oai(server).images.edit(image=("a.png", picture.getvalue(), "image/png"), prompt=PROMPT,
                                extra_body={"loras": [{"name": "style", "scale": 0.5}, {"name": "other"}]})
    assert "loras[][name] 2 time(s), loras[][scale] 1 time(s)" in caught.value.body["message"]


# -- serve --lora-dir ----------------------------------------------------------------------------------------

def test_serve_refuses_a_lora_dir_that_is_not_a_folder(tmp_path):
    server = start_server(tmp_path / "data", "--model-name", "demo", "--lora-dir", str(tmp_path / "nowhere"),
                          wait_ready=False)
    try:
        assert wait_until(lambda: server.process.poll() is not None, timeout=120)
        assert server.process.returncode == 2
        assert f"lora_dir='{tmp_path / 'nowhere'}' is not a folder" in server.output()
    finally:
        server.stop(signal.SIGKILL)


def test_many_tags_are_refused_unread_with_one_message():
    from pixart_sigma.server.loras import MAX_TAGS, take_tags

    walks = []
    prompt, tags, problems = take_tags("<lora:>" * 140_000, lambda: walks.append(1) or "none")
    assert tags == [] and len(problems) == 1 and f"more than {MAX_TAGS} LoRA tags" in problems[0] and not walks
    _, _, problems = take_tags("<lora:> <lora:> <lora:>", lambda: walks.append(1) or "none")
    assert len(problems) == 3 and len(walks) == 1  # the folder is walked once per prompt


def test_a_relative_folder_is_kept_out_of_messages_without_garbling_them(tmp_path, monkeypatch):
    from pixart_sigma.server.loras import ServedLoras

    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras").mkdir()
    served = ServedLoras(Path("loras"))
    text = served.private(f"loras.0.scale=9 is over 4; loras.1.name='x' is not in the LoRA folder {tmp_path / 'loras'}")
    assert text == "loras.0.scale=9 is over 4; loras.1.name='x' is not in this server's LoRA folder"
