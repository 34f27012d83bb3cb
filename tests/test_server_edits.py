"""Edits through the service: the job route (JSON with base64, and multipart), OpenAI's /v1/images/edits (with
the `openai` client) and A1111's /sdapi/v1/img2img, against real server processes (tests/serving.py).

Each route's edit makes the pixels the library makes with the same settings and seed; bad pictures are refused
in the route's own error shape, naming the field, before a job exists; the pictures are stored with the job
under the store's names, survive a restart with a queued job, and go when retention deletes the job.
"""

from __future__ import annotations

import base64
import io
import json
import signal

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pixart_sigma import PixArtSigmaModel, read_settings
from pixart_sigma.server.protocol import MAX_BODY_BYTES, MAX_EDIT_BODY_BYTES
from pixart_sigma.server.store import ORPHAN_UPLOAD_FOLDER, UPLOAD_FOLDER
from serving import start_server, wait_for_job, wait_until

pytestmark = pytest.mark.slow

PROMPT = "a large blue square on the right on a white background"
STEPS = {"num_inference_steps": 4}
EDIT = {"strength": 0.6, "seed": 5, **STEPS}
API_KEY = "edit-test-key"


# -- pictures ----------------------------------------------------------------------------------------------

def png_bytes(image: Image.Image) -> bytes:
    stream = io.BytesIO()
    image.save(stream, "PNG")
    return stream.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


SOURCE = png_bytes(Image.new("RGB", (64, 64), (220, 30, 30)))
_white_right = Image.new("L", (64, 64), 0)
_white_right.paste(255, (32, 0, 64, 64))
MASK = png_bytes(_white_right)  # white repaints: the right half
_clear_right = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
_clear_right.paste((0, 0, 0, 0), (32, 0, 64, 64))
OPENAI_MASK = png_bytes(_clear_right)  # OpenAI's convention: fully transparent repaints (the same right half)
NOT_AN_IMAGE = b"this is not a picture"
TRUNCATED = SOURCE[: len(SOURCE) // 2]
TOO_MANY_PIXELS = png_bytes(Image.new("L", (5000, 5000), 0))  # 25 million pixels, a few kilobytes
SMALL_MASK = png_bytes(Image.new("L", (32, 32), 255))


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def library():
    """The same demo model in this process: what the service must reproduce."""
    model = PixArtSigmaModel(model_name="demo")

    def edit(**call) -> np.ndarray:
        (image,) = model.generate(PROMPT, **call)
        return np.asarray(image.convert("RGB"))

    return edit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("edits") / "data")
    yield server
    server.stop()


def served_pixels(http: httpx.Client, job: dict) -> np.ndarray:
    job = wait_for_job(http, job["id"])
    assert job["status"] == "succeeded", job
    return pixels(http.get(job["images"][0]["url"]).content)


def uploads(server) -> list[str]:
    return sorted(path.name for path in (server.data_dir / UPLOAD_FOLDER).iterdir())


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    return response.json()["error"]


# -- the job route ---------------------------------------------------------------------------------------------

def test_job_route_edit_in_json_base64_makes_the_librarys_pixels_and_stores_its_pictures(server, http, library):
    response = http.post("/v1/generations", json={"prompt": PROMPT, "image": b64(SOURCE),
                                                  "mask": "data:image/png;base64," + b64(MASK), **EDIT})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["pictures"] == ["image", "mask"] and job["settings"]["strength"] == 0.6
    assert {f"{job['id']}-image", f"{job['id']}-mask"} <= set(uploads(server))  # the store's names
    assert (server.data_dir / UPLOAD_FOLDER / f"{job['id']}-image").read_bytes() == SOURCE
    assert np.array_equal(served_pixels(http, job), library(image=SOURCE, mask=MASK, **EDIT))


def test_job_route_edit_as_multipart_upload_makes_the_same_pixels(http, library):
    fields = {"prompt": PROMPT, "strength": "0.6", "seed": "5", "num_inference_steps": "4", "mask_blur": "2"}
    files = {"image": ("../../etc/whatever.png", SOURCE, "image/png"), "mask": ("mask.png", MASK, "image/png")}
    response = http.post("/v1/generations", data=fields, files=files)
    assert response.status_code == 202, response.text
    assert np.array_equal(served_pixels(http, response.json()), library(image=SOURCE, mask=MASK, mask_blur=2, **EDIT))
    # the settings as one JSON field instead of form fields: image-to-image, no mask
    request = json.dumps({"prompt": PROMPT, **EDIT})
    response = http.post("/v1/generations", data={"request": request}, files={"image": ("a", SOURCE, "image/png")})
    assert response.status_code == 202, response.text
    assert np.array_equal(served_pixels(http, response.json()), library(image=SOURCE, **EDIT))


@pytest.mark.parametrize("picture, words", [
    (NOT_AN_IMAGE, "is not an image Pillow can read"), (TRUNCATED, "truncated"), (b"", "is empty"),
    (TOO_MANY_PIXELS, "pixels"),
])
def test_job_route_bad_pictures_are_422_naming_image(server, http, picture, words):
    before = uploads(server)
    for response in (http.post("/v1/generations", json={"prompt": PROMPT, "image": b64(picture), **STEPS}),
                     http.post("/v1/generations", data={"prompt": PROMPT}, files={"image": ("x.png", picture)})):
        error = error_of(response, 422)
        assert error["param"] == "image" and words in error["message"], error
    assert uploads(server) == before  # nothing stored


def test_job_route_bad_edit_settings_and_fields_name_themselves(http):
    cases = [
        ({"prompt": PROMPT, "image": b64(SOURCE), "mask": b64(SMALL_MASK)}, "mask", "must have the picture's size"),
        ({"prompt": PROMPT, "image": b64(SOURCE), "strength": 1.5}, "strength", "above 0 and at most 1"),
        ({"prompt": PROMPT, "image": b64(SOURCE), "strength": 0}, "strength", "above 0 and at most 1"),
        ({"prompt": PROMPT, "image": "%%% not base64 %%%"}, "image", "not valid base64"),
        ({"prompt": PROMPT, "strength": 0.5}, "strength", "apply to edits only"),
        ({"prompt": PROMPT, "image": 7}, "image", "never read from a path"),
    ]
    for body, field, words in cases:
        error = error_of(http.post("/v1/generations", json=body), 422)
        assert field in error["fields"] and words in " ".join(error["fields"][field]), (body, error)
    error = error_of(http.post("/v1/generations", data={"prompt": PROMPT, "strength": "lots"},
                               files={"image": ("x.png", SOURCE)}), 422)
    assert "strength" in error["fields"], error
    error = error_of(http.post("/v1/generations", data={"prompt": PROMPT}, files={"other": ("x.png", SOURCE)}), 422)
    assert "other" in error["fields"], error
    error = error_of(http.post("/v1/generations", content=b"--x\r\nbroken",
                               headers={"content-type": "multipart/form-data"}), 400)  # no boundary
    assert error["code"] == "invalid_multipart" and "boundary" in error["message"].lower(), error


def test_a_picture_path_in_the_body_is_never_read(http, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(SOURCE)
    error = error_of(http.post("/v1/generations", json={"prompt": PROMPT, "image": [str(secret)]}), 422)
    assert "image" in error["fields"]
    # a path given as text is taken for base64 and refused as that, never opened
    error = error_of(http.post("/v1/generations", json={"prompt": PROMPT, "image": str(secret)}), 422)
    assert "base64" in error["message"] and "Pillow" not in error["message"]


def test_an_idempotency_key_replays_an_edit_and_refuses_other_pictures(http):
    body = {"prompt": PROMPT, "image": b64(SOURCE), **EDIT}
    first = http.post("/v1/generations", json=body, headers={"Idempotency-Key": "edit-key-1"})
    again = http.post("/v1/generations", json=body, headers={"Idempotency-Key": "edit-key-1"})
    assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]
    other = {**body, "image": b64(png_bytes(Image.new("RGB", (64, 64), (0, 0, 0))))}
    assert error_of(http.post("/v1/generations", json=other, headers={"Idempotency-Key": "edit-key-1"}),
                    409)["code"] == "idempotency_conflict"
    wait_for_job(http, first.json()["id"])


# -- body limits and the cross-site rules ------------------------------------------------------------------

def test_edit_routes_take_bodies_past_the_small_limit_and_others_do_not(http):
    padding = "x" * (MAX_BODY_BYTES + 1024)
    for path in ("/v1/generations", "/sdapi/v1/img2img"):  # past the guard: refused for what is in it
        response = http.post(path, json={"prompt": PROMPT, "init_images": [b64(NOT_AN_IMAGE)], "negative_prompt": padding})
        assert response.status_code == 422, (path, response.text[:300])
    for path in ("/sdapi/v1/txt2img", "/v1/images/generations"):
        response = http.post(path, json={"prompt": PROMPT, "negative_prompt": padding})
        assert error_of(response, 413)["code"] == "body_too_large"
    too_large = b"0" * (MAX_EDIT_BODY_BYTES + 1)
    for path in ("/v1/generations", "/v1/images/edits", "/sdapi/v1/img2img"):
        response = http.post(path, content=too_large, headers={"content-type": "application/json"})
        error = error_of(response, 413)
        assert error["code"] == "body_too_large" and f"{MAX_EDIT_BODY_BYTES:,}" in error["message"]


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}])
def test_multipart_from_another_site_is_refused(server, http, headers):
    before = http.get("/v1/jobs").json()["total"]
    for path in ("/v1/generations", "/v1/images/edits"):
        response = http.post(path, headers=headers, data={"prompt": PROMPT}, files={"image": ("x.png", SOURCE)})
        assert error_of(response, 403)["code"] == "cross_origin"
    assert http.get("/v1/jobs").json()["total"] == before


def test_multipart_is_415_where_a_route_takes_no_uploads(http):
    for path in ("/sdapi/v1/img2img", "/sdapi/v1/txt2img", "/v1/images/generations"):
        response = http.post(path, data={"prompt": PROMPT}, files={"image": ("x.png", SOURCE)})
        assert error_of(response, 415)["code"] == "unsupported_media_type", path


# -- OpenAI's edits ----------------------------------------------------------------------------------------

def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_openai_client_edit_with_a_transparent_mask_makes_the_librarys_pixels(server, library):
    result = oai(server).images.edit(image=("in.png", SOURCE, "image/png"), mask=("m.png", OPENAI_MASK, "image/png"),
                                     prompt=PROMPT, n=1, size="64x64", response_format="b64_json",
                                     extra_body={"seed": 5, **STEPS})
    (item,) = result.data
    png = base64.b64decode(item.b64_json)
    record = read_settings(Image.open(io.BytesIO(png)))
    assert record["strength"] == 1.0 and record["mask_sha256"] and item.revised_prompt == PROMPT
    assert np.array_equal(pixels(png), library(image=SOURCE, mask=MASK, strength=1.0, seed=5, **STEPS))


def test_openai_edit_without_a_mask_uses_the_images_transparency(server, http, library):
    rgba = Image.open(io.BytesIO(SOURCE)).convert("RGBA")
    rgba.paste((0, 0, 0, 0), (32, 0, 64, 64))
    transparent = png_bytes(rgba)
    result = oai(server).images.edit(image=("in.png", transparent, "image/png"), prompt=PROMPT,
                                     response_format="url", extra_body={"seed": 5, **STEPS})
    served = http.get(result.data[0].url).content
    assert np.array_equal(pixels(served), library(image=transparent, mask=OPENAI_MASK, strength=1.0, seed=5, **STEPS))


@pytest.mark.parametrize("image, mask, field, words", [
    (SOURCE, None, "image", "no fully transparent pixel"),  # as OpenAI refuses an image it cannot take a mask from
    (SOURCE, MASK, "mask", "no fully transparent pixel"),
    (SOURCE, png_bytes(Image.new("RGBA", (64, 64), (255, 255, 255, 255))), "mask", "no fully transparent pixel"),
    (NOT_AN_IMAGE, OPENAI_MASK, "image", "is not an image Pillow can read"),
    (TRUNCATED, OPENAI_MASK, "image", "truncated"),
    (SOURCE, png_bytes(Image.new("RGBA", (32, 32))), "mask", "must have the picture's size"),
])
def test_openai_edit_refusals_are_400_in_openais_shape(server, image, mask, field, words):
    pictures = {"image": ("in.png", image, "image/png")} | ({"mask": ("m.png", mask, "image/png")} if mask else {})
    with pytest.raises(openai.BadRequestError) as caught:
        oai(server).images.edit(prompt=PROMPT, **pictures)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == field and words in error["message"], error


def test_openai_edit_bad_strength_and_size_name_their_fields(server):
    for size, extra, field in (("64x64", {"strength": 2}, "strength"), ("65x64", {}, "size")):
        with pytest.raises(openai.BadRequestError) as caught:
            oai(server).images.edit(image=("in.png", SOURCE, "image/png"), mask=("m.png", OPENAI_MASK, "image/png"),
                                    prompt=PROMPT, size=size, extra_body=extra)
        assert list(caught.value.body["fields"]) == [field], caught.value.body


# -- A1111's img2img ---------------------------------------------------------------------------------------

def test_img2img_inpainting_makes_the_librarys_pixels_with_a1111s_answer(http, library):
    response = http.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "init_images": [b64(SOURCE)], "mask": b64(MASK), "denoising_strength": 0.6, "mask_blur": 2,
        "inpainting_fill": 1, "inpaint_full_res": 0, "resize_mode": 0, "steps": 4, "seed": 5, "sampler_name": "Euler"})
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    expected = library(image=SOURCE, mask=MASK, mask_blur=2, scheduler="euler", **EDIT)
    assert np.array_equal(pixels(base64.b64decode(answer["images"][0])), expected)
    info = json.loads(answer["info"])
    assert info["denoising_strength"] == 0.6 and info["extra_generation_params"] == {"Mask blur": 2}
    assert "Denoising strength: 0.6" in info["infotexts"][0] and info["sampler_name"] == "Euler"
    parameters = answer["parameters"]
    assert parameters["init_images"] is None and parameters["mask"] is None and parameters["inpainting_fill"] == 1
    assert parameters["denoising_strength"] == 0.6 and parameters["inpaint_full_res"] is False


def test_img2img_only_masked_and_inverted_map_to_our_settings(http, library):
    response = http.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "init_images": [b64(SOURCE)], "mask": b64(MASK), "denoising_strength": 0.6,
        "inpaint_full_res": True, "inpaint_full_res_padding": 8, "inpainting_mask_invert": 1, **STEPS, "seed": 5})
    assert response.status_code == 200, response.text[:500]
    expected = library(image=SOURCE, mask=MASK, inpaint_area="masked", inpaint_padding=8, invert_mask=True, **EDIT)
    assert np.array_equal(pixels(base64.b64decode(response.json()["images"][0])), expected)


@pytest.mark.parametrize("change, field, words", [
    ({"init_images": [b64(NOT_AN_IMAGE)]}, "init_images", "is not an image Pillow can read"),
    ({"init_images": [b64(TRUNCATED)]}, "init_images", "truncated"),
    ({"init_images": [b64(TOO_MANY_PIXELS)]}, "init_images", "pixels"),
    ({"init_images": [b64(SOURCE), b64(SOURCE)]}, "init_images", "one is edited per request"),
    ({"init_images": []}, "init_images", "send a list with the picture"),
    ({"mask": b64(SMALL_MASK)}, "mask", "must have the picture's size"),
    ({"denoising_strength": 1.5}, "denoising_strength", "above 0 and at most 1"),
    ({"resize_mode": 2}, "resize_mode", "resize and fill"),
    ({"resize_mode": 0, "width": 128, "height": 64}, "resize_mode", "would stretch the 64x64 picture to 128x64"),
    ({"mask": b64(MASK), "inpainting_fill": 0}, "inpainting_fill", "(fill) is not available"),
    ({"inpainting_fill": 7}, "inpainting_fill", "is not valid"),
    ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "0 or 1"),
])
def test_img2img_refusals_are_422_in_a1111s_shape_naming_the_field(server, http, change, field, words):
    before = uploads(server)
    response = http.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [b64(SOURCE)], **STEPS,
                                                    **change})
    assert response.status_code == 422, response.text[:500]
    body = response.json()
    assert body["detail"] == body["error"]["message"]
    assert field in body["error"]["fields"] and words in " ".join(body["error"]["fields"][field]), body
    assert uploads(server) == before


def test_img2img_without_a_mask_takes_any_inpainting_fill_and_resizes_by_cropping(http):
    response = http.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [b64(SOURCE)],
                                                    "inpainting_fill": 0, "width": 96, "height": 64, **EDIT})
    assert response.status_code == 200, response.text[:500]
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).size == (96, 64)


# -- restart, retention, the API key -----------------------------------------------------------------------

def test_a_queued_edit_survives_a_restart_and_its_pictures_go_with_the_job(tmp_path, library):
    data = tmp_path / "data"
    flags = ("--model-name", "demo", "--keep-jobs", "1", "--keep-grace", "0")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    first = start_server(data, *flags, faults=True, api_key=API_KEY)
    try:
        with first.client(headers=auth) as http:
            running = http.post("/v1/generations", json={"prompt": "[slow] hold", "num_inference_steps": 100}).json()
            queued = http.post("/v1/generations", data={"prompt": PROMPT, "strength": "0.6", "seed": "5",
                                                        "num_inference_steps": "4"},
                               files={"image": ("a.png", SOURCE), "mask": ("b.png", MASK)}).json()
            assert queued["status"] == "queued", queued
            wait_until(lambda: http.get(f"/v1/jobs/{running['id']}").json()["progress"]["step"] >= 1, 30)
            with first.client() as anonymous:  # the key guards the edit routes too
                for path in ("/v1/generations", "/v1/images/edits", "/sdapi/v1/img2img"):
                    assert error_of(anonymous.post(path, json={"prompt": PROMPT}), 401)["code"] == "invalid_api_key"
    finally:
        first.stop(signal.SIGKILL)
    pictures = [f"{queued['id']}-image", f"{queued['id']}-mask"]
    (data / UPLOAD_FOLDER / "planted").write_bytes(b"no job lists this")

    second = start_server(data, *flags, faults=True, api_key=API_KEY)
    try:
        with second.client(headers=auth) as http:
            job = wait_for_job(http, queued["id"])
            assert job["status"] == "succeeded" and job["settings"] == queued["settings"], job
            served = pixels(http.get(job["images"][0]["url"]).content)
            assert np.array_equal(served, library(image=SOURCE, mask=MASK, **EDIT))
            assert uploads(second) == pictures  # the job's kept; the planted file moved aside, not deleted
            assert (data / ORPHAN_UPLOAD_FOLDER / "planted").read_bytes() == b"no job lists this"
            later = http.post("/v1/generations", json={"prompt": "a red circle", **STEPS}).json()
            wait_for_job(http, later["id"])
            wait_until(lambda: http.get(f"/v1/jobs/{queued['id']}").status_code == 404, 30)  # retention's turn
            assert uploads(second) == []
    finally:
        second.stop()


def test_a_list_setting_sent_as_repeated_form_fields_is_a_list(http):
    """OpenAPI tools (schemathesis among them) send an array in a form as the same field repeated, without []."""
    fields = {"prompt": PROMPT, "seed": "5", "num_inference_steps": "2", "expand": ["0", "0", "8", "0"]}
    response = http.post("/v1/generations", data=fields, files={"image": ("a.png", SOURCE, "image/png")})
    assert response.status_code == 202, response.text
    assert response.json()["settings"]["expand"] == [0, 0, 8, 0]
    fields["seed"] = ["5", "6"]  # a field that is not a list, repeated: refused by name
    response = http.post("/v1/generations", data=fields, files={"image": ("a.png", SOURCE, "image/png")})
    assert response.status_code == 422 and "seed is sent 2 times" in response.text
