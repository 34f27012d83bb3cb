"""The HTTP API of `pixart-sigma serve`, route by route and status by status, against real server processes.

Two servers are shared by the module: `server` (tests/fault_server.py: the real CLI and service, where a
prompt containing [slow] takes 0.2 s a step, so the queue can be filled on purpose) and `keyed` (the plain
`pixart-sigma serve`, bound to 0.0.0.0 with an API key; traffic goes to 127.0.0.1 only). Every wait is bounded.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse

import httpx
import numpy as np
import pytest
from PIL import Image

from pixart_sigma.server.protocol import MAX_EDIT_BODY_BYTES
from pixart_sigma.settings import EditSettings
from serving import Server, free_port, start_server, wait_for_job, wait_until

pytestmark = pytest.mark.slow

MiB = 1 << 20
FAST = {"num_inference_steps": 2, "seed": 1}  # a demo job of about 0.1 s


# -- helpers -----------------------------------------------------------------------------------------------

def post(client: httpx.Client, body, **headers) -> httpx.Response:
    """POST /v1/generations with `body` as JSON, or as raw bytes when it is bytes."""
    if isinstance(body, bytes):
        return client.post("/v1/generations", content=body, headers={"content-type": "application/json", **headers})
    return client.post("/v1/generations", json=body, headers=headers)


def submit(client: httpx.Client, body: dict, **headers) -> dict:
    response = post(client, body, **headers)
    assert response.status_code == 202, response.text
    return response.json()


def read_events(client: httpx.Client, job_id: str, timeout: float = 60, stop=None) -> list[tuple[str, dict]]:
    """The job's server-sent events as (event, data), until `done` (or until `stop(events)` is true)."""
    events: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(timeout)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no done event for {job_id} in {timeout} s: {events}")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                if name == "done" or (stop is not None and stop(events)):
                    break
    return events


def raw_request(url: str, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A request whose path is sent exactly as written (httpx would resolve `..` before sending)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error_of(response: httpx.Response, status: int) -> dict:
    """The error object of a response, after checking its status and its one shape."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"message", "type", "param", "code"} <= set(error)
    return error


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def cancel_all(client: httpx.Client, job_ids) -> None:
    for job_id in job_ids:
        client.delete(f"/v1/jobs/{job_id}")
    for job_id in job_ids:
        wait_for_job(client, job_id, timeout=30)


# -- servers -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("api") / "data", "--model-name", "demo", "--queue-size", "8",
                          faults=True)
    yield server
    server.stop()


API_KEY = secrets.token_urlsafe(24)


def ready(server: Server, key: str) -> bool:
    try:
        return httpx.get(server.url + "/readyz", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """The plain CLI on 0.0.0.0 with an API key (it must start); requests go to 127.0.0.1 only."""
    server = start_server(tmp_path_factory.mktemp("keyed") / "data", "--model-name", "demo", "--host", "0.0.0.0",
                          "--api-key", API_KEY, wait_ready=False)
    assert server.url.startswith("http://127.0.0.1:")
    try:  # start_server's own wait asks /readyz without the key, which this server answers 401
        wait_until(lambda: server.process.poll() is not None or ready(server, API_KEY), 120, interval=0.2)
        assert server.process.poll() is None, server.output()[-3000:]
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    yield server
    assert server.stop() == 0, server.output()[-2000:]


@pytest.fixture(scope="module")
def finished(client) -> dict:
    """One finished job (seed 7, 4 steps) and its image."""
    job = submit(client, {"prompt": "a red circle on a blue background", "seed": 7, "num_inference_steps": 4,
                          "negative_prompt": "blurry"})
    return wait_for_job(client, job["id"], timeout=60)


# -- POST /v1/generations: 202 -----------------------------------------------------------------------------

def test_post_returns_202_with_the_job_a_location_and_its_queue_position(client):
    response = post(client, {"prompt": "a green square", **FAST})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert "idempotent-replayed" not in response.headers
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["model_name"] == "demo" and job["prompt"] == "a green square"
    assert job["settings"]["num_inference_steps"] == 2 and job["settings"]["seed"] == 1
    assert job["settings"]["width"] == job["settings"]["height"] == 64  # the demo's native size, filled in
    assert "device" not in job["settings"] and "dtype" not in job["settings"]
    assert job["seeds"] == [1] and job["images"] == [] and job["error"] is None
    assert job["queue_position"] == 1  # nothing else was waiting
    assert job["links"]["events"] == f"/v1/jobs/{job['id']}/events"
    done = wait_for_job(client, job["id"], timeout=60)
    assert done["status"] == "succeeded" and done["queue_position"] is None
    assert done["progress"] == {"step": 2, "total": 2}
    assert [image["seed"] for image in done["images"]] == [1]


def test_a_random_seed_is_drawn_at_submission_and_shown(client):
    job = submit(client, {"prompt": "a blue triangle", "num_inference_steps": 1, "num_images_per_prompt": 2})
    seed = job["settings"]["seed"]
    assert 0 <= seed < 2**32 and job["seeds"] == [seed, seed + 1]
    done = wait_for_job(client, job["id"], timeout=60)
    assert done["settings"]["seed"] == seed and [image["seed"] for image in done["images"]] == [seed, seed + 1]
    assert len({image["name"] for image in done["images"]}) == 2


# -- POST /v1/generations: 422, each bad field named ------------------------------------------------------

BAD_INPUT = [
    # (id, body: dict or raw JSON bytes, fields that must be named)
    ("prompt-missing", {"seed": 1}, {"prompt"}),
    ("prompt-empty", {"prompt": ""}, {"prompt"}),
    ("prompt-whitespace", {"prompt": "  \t\n "}, {"prompt"}),
    ("prompt-nul", {"prompt": "a red\x00 fox"}, {"prompt"}),
    ("prompt-escape", {"prompt": "\x1b[31ma red fox"}, {"prompt"}),
    ("prompt-bell", {"prompt": "a fox\x07"}, {"prompt"}),
    ("prompt-not-a-string", {"prompt": 42}, {"prompt"}),
    ("prompt-too-long", {"prompt": "a" * 10_001}, {"prompt"}),
    ("negative-prompt-nul", {"prompt": "a fox", "negative_prompt": "x\x00"}, {"negative_prompt"}),
    ("width-not-multiple-of-8", {"prompt": "a fox", "width": 100}, {"width"}),
    ("height-not-multiple-of-8", {"prompt": "a fox", "height": 65}, {"height"}),
    ("width-under-64", {"prompt": "a fox", "width": 56}, {"width"}),
    ("height-under-64", {"prompt": "a fox", "height": 8}, {"height"}),
    ("width-over-2048", {"prompt": "a fox", "width": 2056}, {"width"}),
    ("height-over-2048", {"prompt": "a fox", "height": 4096}, {"height"}),
    ("width-zero", {"prompt": "a fox", "width": 0}, {"width"}),
    ("height-zero", {"prompt": "a fox", "height": 0}, {"height"}),
    ("width-negative", {"prompt": "a fox", "width": -64}, {"width"}),
    ("height-negative", {"prompt": "a fox", "height": -512}, {"height"}),
    ("width-fraction", {"prompt": "a fox", "width": 64.5}, {"width"}),
    ("pixel-budget", {"prompt": "a fox", "width": 2048, "height": 2048, "num_images_per_prompt": 5}, {"width"}),
    ("steps-zero", {"prompt": "a fox", "num_inference_steps": 0}, {"num_inference_steps"}),
    ("steps-negative", {"prompt": "a fox", "num_inference_steps": -5}, {"num_inference_steps"}),
    ("steps-over-200", {"prompt": "a fox", "num_inference_steps": 201}, {"num_inference_steps"}),
    ("steps-string", {"prompt": "a fox", "num_inference_steps": "20"}, {"num_inference_steps"}),
    ("guidance-nan", b'{"prompt": "a fox", "guidance_scale": NaN}', {"guidance_scale"}),
    ("guidance-infinity", b'{"prompt": "a fox", "guidance_scale": Infinity}', {"guidance_scale"}),
    ("guidance-minus-infinity", b'{"prompt": "a fox", "guidance_scale": -Infinity}', {"guidance_scale"}),
    ("guidance-overflow", b'{"prompt": "a fox", "guidance_scale": 1e999}', {"guidance_scale"}),
    ("guidance-negative", {"prompt": "a fox", "guidance_scale": -0.5}, {"guidance_scale"}),
    ("guidance-over-20", {"prompt": "a fox", "guidance_scale": 20.5}, {"guidance_scale"}),
    ("seed-under-minus-1", {"prompt": "a fox", "seed": -2}, {"seed"}),
    ("seed-2-53", {"prompt": "a fox", "seed": 2**53}, {"seed"}),
    ("seed-huge", {"prompt": "a fox", "seed": 10**40}, {"seed"}),
    ("seed-float", {"prompt": "a fox", "seed": 1.5}, {"seed"}),
    ("seed-string", {"prompt": "a fox", "seed": "7"}, {"seed"}),
    ("seed-bool", {"prompt": "a fox", "seed": True}, {"seed"}),
    ("seed-plus-batch-over-2-53", {"prompt": "a fox", "seed": 2**53 - 1, "num_images_per_prompt": 2}, {"seed"}),
    ("n-zero", {"prompt": "a fox", "num_images_per_prompt": 0}, {"num_images_per_prompt"}),
    ("n-negative", {"prompt": "a fox", "num_images_per_prompt": -1}, {"num_images_per_prompt"}),
    ("n-17", {"prompt": "a fox", "num_images_per_prompt": 17}, {"num_images_per_prompt"}),
    ("n-huge", {"prompt": "a fox", "num_images_per_prompt": 10**30}, {"num_images_per_prompt"}),
    ("scheduler-unknown", {"prompt": "a fox", "scheduler": "plms"}, {"scheduler"}),
    ("binning-string", {"prompt": "a fox", "use_resolution_binning": "yes"}, {"use_resolution_binning"}),
    ("max-sequence-length-zero", {"prompt": "a fox", "max_sequence_length": 0}, {"max_sequence_length"}),
    ("unknown-setting", {"prompt": "a fox", "steps": 20}, {"steps"}),
    ("model-not-served", {"prompt": "a fox", "model_name": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"}, {"model_name"}),
    ("model-not-served-path", {"prompt": "a fox", "model_name": "/etc"}, {"model_name"}),
    ("device-in-request", {"prompt": "a fox", "device": "cpu"}, {"device"}),
    ("dtype-in-request", {"prompt": "a fox", "dtype": "float32"}, {"dtype"}),
]


@pytest.mark.parametrize("body, fields", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_422_naming_the_field(client, body, fields):
    error = error_of(post(client, body), 422)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_settings"
    assert fields <= set(error["fields"]), error
    assert error["param"] in error["fields"]
    for messages in error["fields"].values():
        assert messages and all(isinstance(message, str) and message for message in messages)


def test_integral_json_numbers_are_integers(client):
    """JSON Schema's "integer" (what /openapi.json promises) includes 7.0; JavaScript cannot even send 7 otherwise."""
    response = post(client, b'{"prompt": "a fox", "seed": 7.0, "num_inference_steps": 2.0, "width": 64.0}')
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["settings"]["seed"] == 7 and isinstance(job["settings"]["seed"], int)
    wait_for_job(client, job["id"], timeout=60)


def test_every_bad_field_of_one_request_is_named_at_once(client):
    body = {"prompt": " ", "width": 63, "height": -8, "num_inference_steps": 0, "guidance_scale": 21,
            "seed": 2**53, "num_images_per_prompt": 0, "scheduler": "x", "colour": "red", "model_name": "other",
            "device": "cpu", "dtype": "float16"}
    error = error_of(post(client, body), 422)
    assert {"prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed", "num_images_per_prompt",
            "scheduler", "colour", "model_name", "device", "dtype"} <= set(error["fields"]), error["fields"]


def test_unknown_setting_message_lists_the_valid_names(client):
    error = error_of(post(client, {"prompt": "a fox", "steps": 20}), 422)
    message = error["fields"]["steps"][0]
    for name in ("num_inference_steps", "guidance_scale", "seed", "width", "height", "num_images_per_prompt"):
        assert name in message


def test_server_settings_in_the_request_say_they_are_set_by_the_server(client):
    error = error_of(post(client, {"prompt": "a fox", "device": "cuda", "dtype": "bfloat16"}), 422)
    assert "set by the server" in error["fields"]["device"][0] and "--device" in error["fields"]["device"][0]
    assert "set by the server" in error["fields"]["dtype"][0]


def test_model_name_not_served_names_the_served_ones(client):
    error = error_of(post(client, {"prompt": "a fox", "model_name": "other"}), 422)
    assert "demo" in error["fields"]["model_name"][0]


@pytest.mark.parametrize("body", [b"[]", b'"a fox"', b"42", b"null", b""], ids=["list", "string", "number", "null", "empty"])
def test_a_body_that_is_not_an_object_is_422_on_the_settings(client, body):
    error = error_of(post(client, body), 422)
    assert "JSON object" in error["message"] or "prompt" in error["message"]
    # The message's first word is not a field: the form must not show it under a field called "the".
    assert "the" not in error["fields"], error["fields"]


def test_a_422_says_the_client_should_not_retry(client):
    response = post(client, {"prompt": ""})
    assert response.status_code == 422 and response.headers["x-should-retry"] == "false"


# -- 400 malformed JSON, 413 body too large -----------------------------------------------------------------

@pytest.mark.parametrize("body", [b"{bad", b'{"prompt": "a fox",}', b'{"prompt": "a', b"\xff\xfe{}", b"{'prompt': 'x'}"],
                         ids=["bare", "trailing-comma", "unterminated", "not-utf8", "single-quotes"])
def test_malformed_json_is_400(client, body):
    error = error_of(post(client, body), 400)
    assert error["code"] == "invalid_json" and "JSON" in error["message"]


def test_body_over_the_job_routes_limit_with_content_length_is_413(client):
    body = json.dumps({"prompt": "a fox", "negative_prompt": "x" * MAX_EDIT_BODY_BYTES}).encode()
    assert len(body) > MAX_EDIT_BODY_BYTES  # the job route takes edits: its limit is the edit routes' one
    error = error_of(post(client, body), 413)
    assert error["code"] == "body_too_large"


def test_body_over_1_mib_chunked_without_content_length_is_413_where_no_pictures_are_taken(client):
    def chunks():
        yield b'{"prompt": "a fox", "negative_prompt": "'
        for _ in range(20):
            yield b"x" * (64 * 1024)
        yield b'"}'

    response = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert error_of(response, 413)["code"] == "body_too_large"


def test_a_body_of_exactly_1_mib_is_read(client):
    head, tail = b'{"prompt": "a fox", "negative_prompt": "', b'"}'
    body = head + b"x" * (MiB - len(head) - len(tail)) + tail
    assert len(body) == MiB
    error = error_of(post(client, body), 422)  # read and validated, not refused for its size
    assert "negative_prompt" in error["fields"]


# -- 429 queue full, DELETE on queued / running / finished ------------------------------------------------

def test_queue_full_is_429_with_retry_after_and_cancel_of_queued_and_running_jobs(client):
    slow = {"prompt": "[slow] a fox", "num_inference_steps": 50, "seed": 3}  # 10 s: the queue cannot drain meanwhile
    accepted = [submit(client, slow)]
    wait_until(lambda: client.get(f"/v1/jobs/{accepted[0]['id']}").json()["status"] == "running", 10)
    try:
        for _ in range(8):  # the running job plus 8 waiting
            accepted.append(submit(client, slow))
        assert [job["queue_position"] for job in accepted[1:]] == list(range(1, 9))
        response = post(client, slow)
        error = error_of(response, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert int(response.headers["retry-after"]) >= 1
        assert "x-should-retry" not in response.headers
        assert post(client, {**slow, "seed": 4}, **{"Idempotency-Key": "full-queue"}).status_code == 429
        samples = metric_samples(client)
        assert samples[("pixart_queue_depth", ())] == 8
        assert samples[("pixart_rejections_total", (("reason", "queue_full"),))] >= 2
        assert samples[("pixart_jobs", (("status", "queued"),))] == 8
        assert samples[("pixart_jobs", (("status", "running"),))] == 1

        # DELETE of a queued job: 202 and cancelled at once; the others move up.
        last = accepted[-1]["id"]
        response = client.delete(f"/v1/jobs/{last}")
        assert response.status_code == 202 and response.json()["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{last}").json()["error"]
        assert error_of(client.delete(f"/v1/jobs/{last}"), 409)["code"] == "job_finished"
        second = accepted[2]["id"]
        assert client.delete(f"/v1/jobs/{accepted[1]['id']}").status_code == 202
        assert client.get(f"/v1/jobs/{second}").json()["queue_position"] == 1

        # DELETE of the running job: 202 at once, cancelled within a step (0.2 s).
        running = accepted[0]["id"]
        before = client.get(f"/v1/jobs/{running}").json()["progress"]["step"]
        response = client.delete(f"/v1/jobs/{running}")
        assert response.status_code == 202 and response.json()["status"] in ("running", "cancelled")
        job = wait_for_job(client, running, timeout=5)
        assert job["status"] == "cancelled" and job["progress"]["step"] <= before + 3
        assert job["images"] == [] and job["error"].startswith("cancelled at step")
    finally:
        cancel_all(client, [job["id"] for job in accepted])
    assert metric_samples(client)[("pixart_queue_depth", ())] == 0


def test_delete_of_a_finished_job_is_409(client, finished):
    error = error_of(client.delete(f"/v1/jobs/{finished['id']}"), 409)
    assert error["code"] == "job_finished" and "succeeded" in error["message"]
    assert client.get(f"/v1/jobs/{finished['id']}").json()["status"] == "succeeded"


# -- GET /v1/jobs/{id}, 404 --------------------------------------------------------------------------------

def test_get_job(client, finished):
    response = client.get(f"/v1/jobs/{finished['id']}")
    assert response.status_code == 200
    job = response.json()
    assert job == finished
    assert job["started"] >= job["created"] and job["finished"] >= job["started"]
    assert job["settings"]["negative_prompt"] == "blurry" and job["seeds"] == [7]


@pytest.mark.parametrize("job_id", ["0" * 32, "f" * 32, "not-a-job", "A" * 32, "0" * 33, "x" * 5000,
                                    "'; DROP TABLE jobs; --"])
def test_unknown_or_malformed_job_ids_are_404(client, job_id):
    quoted = urllib.parse.quote(job_id, safe="")
    for method in ("GET", "DELETE"):
        error = error_of(client.request(method, f"/v1/jobs/{quoted}"), 404)
        assert error["code"] == "not_found"
    assert error_of(client.get(f"/v1/jobs/{quoted}/events"), 404)["code"] == "not_found"


@pytest.mark.parametrize("path", ["/v1/jobs/../etc", "/v1/jobs/..%2Fetc", "/v1/jobs/%2e%2e%2fetc%2fpasswd",
                                  "/v1/jobs/../../jobs.sqlite3", "/v1/jobs/%2e%2e"])
def test_path_traversal_job_ids_are_404(server, path):
    status, headers, body = raw_request(server.url, "GET", path)
    assert status == 404, (path, status, body[:200])
    assert json.loads(body)["error"]["code"] == "not_found"


# -- GET /v1/jobs: history ---------------------------------------------------------------------------------

def test_job_history_is_newest_first_and_pages(client):
    made = [submit(client, {"prompt": f"page {k}", "num_inference_steps": 1, "seed": k}) for k in range(3)]
    for job in made:
        wait_for_job(client, job["id"], timeout=60)
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert first["limit"] == 2 and first["total"] >= 3
    assert [job["id"] for job in first["jobs"]] == [made[2]["id"], made[1]["id"]]
    assert first["next"]
    seen, page, pages = [], first, 0
    while True:
        pages += 1
        assert pages <= 100
        seen += page["jobs"]
        if page["next"] is None:
            break
        page = client.get("/v1/jobs", params={"limit": 2, "before": page["next"]}).json()
    assert len(seen) == first["total"] == len({job["id"] for job in seen})
    created = [job["created"] for job in seen]
    assert created == sorted(created, reverse=True)
    whole = client.get("/v1/jobs", params={"limit": 100}).json()
    assert whole["next"] is None or whole["total"] > 100
    assert client.get("/v1/jobs").json()["limit"] == 20


def test_paging_while_jobs_are_added_never_repeats_or_skips_a_job(client):
    for job in [submit(client, {"prompt": f"walk {k}", "num_inference_steps": 1, "seed": k}) for k in range(4)]:
        wait_for_job(client, job["id"], timeout=60)
    before = {job["id"] for job in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    seen, added = [], []
    while True:
        seen += [job["id"] for job in page["jobs"]]
        if len(added) < 3:  # each would shift an offset by one
            added.append(submit(client, {"prompt": "added while paging", "num_inference_steps": 1}))
        if page["next"] is None or len(seen) > 200:
            break
        page = client.get("/v1/jobs", params={"limit": 2, "before": page["next"]}).json()
    for job in added:
        wait_for_job(client, job["id"], timeout=60)
    assert len(seen) == len(set(seen))
    assert before <= set(seen)  # every job there when the walk began, once


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1000}, {"limit": 101}, {"limit": -1},
                                    {"before": "x"}, {"before": "1.5_" + "g" * 32}, {"before": "1" * 100}])
def test_job_history_bad_page_is_422(client, params):
    error = error_of(client.get("/v1/jobs", params=params), 422)
    assert error["param"] == next(iter(params))


def test_an_offset_is_refused_with_what_to_send_instead(client):
    error = error_of(client.get("/v1/jobs", params={"offset": 20}), 422)
    assert error["param"] == "offset" and "before" in error["message"] and "next" in error["message"]


@pytest.mark.parametrize("params", [{"limit": "abc"}, {"limit": "1.5"}])
def test_job_history_non_integer_page_is_422_in_the_one_error_shape(client, params):
    error = error_of(client.get("/v1/jobs", params=params), 422)
    assert error["param"] == next(iter(params))


# -- SSE /v1/jobs/{id}/events ------------------------------------------------------------------------------

def test_events_give_the_queue_position_every_step_in_order_and_done_with_the_job(client):
    blocker = submit(client, {"prompt": "[slow] hold the worker", "num_inference_steps": 5, "seed": 1})
    job = submit(client, {"prompt": "a yellow star", "num_inference_steps": 6, "seed": 5})
    assert job["queue_position"] in (1, 2)
    events = read_events(client, job["id"], timeout=60)
    names = [name for name, _ in events]
    assert names[0] == "queued" and isinstance(events[0][1]["position"], int) and events[0][1]["position"] >= 1
    positions = [data["position"] for name, data in events if name == "queued"]
    assert positions == sorted(positions, reverse=True) and positions[-1] == 1
    assert "running" in names and names.index("running") < names.index("progress")
    steps = [(data["step"], data["total"]) for name, data in events if name == "progress"]
    assert steps == [(step, 6) for step in range(1, 7)]
    assert names[-1] == "done" and names.count("done") == 1
    done = events[-1][1]
    assert done["id"] == job["id"] and done["status"] == "succeeded" and len(done["images"]) == 1
    assert done == client.get(f"/v1/jobs/{job['id']}").json()
    wait_for_job(client, blocker["id"], timeout=30)


def test_events_of_a_finished_job_end_with_done_at_once(client, finished):
    started = time.monotonic()
    events = read_events(client, finished["id"], timeout=10)
    assert time.monotonic() - started < 2
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
    assert [name for name, _ in events].count("done") == 1


def test_events_of_a_cancelled_queued_job_end_with_done_cancelled(client):
    blocker = submit(client, {"prompt": "[slow] hold the worker", "num_inference_steps": 10, "seed": 1})
    queued = submit(client, {"prompt": "never runs", **FAST})
    try:
        assert client.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
        events = read_events(client, queued["id"], timeout=10)
        assert events[-1][0] == "done" and events[-1][1]["status"] == "cancelled"
        assert not any(name == "progress" for name, _ in events)
    finally:
        cancel_all(client, [blocker["id"], queued["id"]])


# -- GET /v1/images/{name} ---------------------------------------------------------------------------------

def test_image_is_the_png_with_its_settings(client, finished, tmp_path):
    from pixart_sigma import read_settings

    (image,) = finished["images"]
    assert image["url"] == f"/v1/images/{image['name']}" and image["seed"] == 7
    response = client.get(image["url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert "immutable" in response.headers["cache-control"]
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    path = tmp_path / image["name"]
    path.write_bytes(response.content)
    settings = read_settings(path)
    assert settings["prompt"] == "a red circle on a blue background"
    assert settings["seed"] == 7 and settings["num_inference_steps"] == 4
    assert settings["negative_prompt"] == "blurry" and settings["model_name"] == "demo"
    assert (settings["width"], settings["height"]) == (64, 64)
    with Image.open(io.BytesIO(response.content)) as png:
        assert png.size == (64, 64)
        parameters = png.text["parameters"]
    lines = parameters.split("\n")
    assert lines[0] == "a red circle on a blue background"
    assert lines[1] == "Negative prompt: blurry"
    assert "Steps: 4" in lines[2] and "Seed: 7" in lines[2] and "Size: 64x64" in lines[2]


@pytest.mark.parametrize("path", ["/v1/images/../jobs.sqlite3", "/v1/images/%2e%2e%2fjobs.sqlite3",
                                  "/v1/images/..%2Fjobs.sqlite3", "/v1/images/%2E%2E%2Fjobs.sqlite3",
                                  "/v1/images/jobs.sqlite3", "/v1/images/..", "/v1/images/%2e%2e",
                                  "/v1/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/v1/images/" + "0" * 32 + "-0.png",
                                  "/v1/images/" + "0" * 32 + "-0.png%0a", "/v1/images/x.png",
                                  "/v1/images/" + "0" * 32 + "-0.PNG", "/v1/images/%00.png"])
def test_other_image_names_are_404_and_never_the_database(server, client, finished, path):
    status, headers, body = raw_request(server.url, "GET", path)
    assert status == 404, (path, status)
    assert not body.startswith(b"SQLite format")
    assert json.loads(body)["error"]["code"] == "not_found"
    # The real image name with a newline after it (Python's `$` matches before one) is still 404.
    name = finished["images"][0]["name"]
    assert raw_request(server.url, "GET", f"/v1/images/{name}%0A")[0] == 404


# -- Idempotency-Key ---------------------------------------------------------------------------------------

def test_idempotency_key_replays_the_same_job(client):
    key = secrets.token_hex(8)
    body = {"prompt": "an orange hexagon", "num_inference_steps": 2, "seed": 11}
    first = post(client, body, **{"Idempotency-Key": key})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    again = post(client, dict(reversed(list(body.items()))), **{"Idempotency-Key": key})  # same body, other key order
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    done = wait_for_job(client, first.json()["id"], timeout=60)
    late = post(client, body, **{"Idempotency-Key": key})  # after it finished: still the same job, not a new one
    assert late.status_code == 202 and late.json()["id"] == done["id"] and late.json()["status"] == "succeeded"
    error = error_of(post(client, {**body, "seed": 12}, **{"Idempotency-Key": key}), 409)
    assert error["code"] == "idempotency_conflict" and error["param"] == "Idempotency-Key"
    total = client.get("/v1/jobs").json()["total"]
    other = submit(client, body, **{"Idempotency-Key": key + "-other"})  # another key: another job
    assert other["id"] != done["id"] and client.get("/v1/jobs").json()["total"] == total + 1
    wait_for_job(client, other["id"], timeout=60)


@pytest.mark.parametrize("key", ["", "k" * 201], ids=["empty", "too-long"])
def test_a_bad_idempotency_key_is_400(client, key):
    error = error_of(post(client, {"prompt": "a fox", **FAST}, **{"Idempotency-Key": key}), 400)
    assert error["param"] == "Idempotency-Key"


# -- schema, health, readiness, metrics --------------------------------------------------------------------

def test_schema_is_the_request_body_this_server_accepts(client):
    response = client.get("/v1/schema")
    assert response.status_code == 200
    schema = response.json()
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert schema["properties"]["model_name"]["enum"] == ["demo"]
    assert "device" not in schema["properties"] and "dtype" not in schema["properties"]
    assert schema["properties"]["num_inference_steps"]["maximum"] == 200
    openapi = client.get("/openapi.json").json()
    body = openapi["paths"]["/v1/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # The same settings (FastAPI leaves out `"default": null` when it writes /openapi.json), and an edit's fields.
    without_null_defaults = {name: {k: v for k, v in prop.items() if (k, v) != ("default", None)}
                             for name, prop in schema["properties"].items()}
    assert {name: body["properties"][name] for name in schema["properties"]} == without_null_defaults
    assert set(body["properties"]) - set(schema["properties"]) == {"image", "mask", *EditSettings.model_fields}
    assert body["required"] == schema["required"] and body["additionalProperties"] is False


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ready", "models": ["demo"]}


def test_metrics_are_prometheus_text_with_every_series(client, finished):
    post(client, {"prompt": ""})  # one rejection at least
    samples = metric_samples(client)
    assert ("pixart_queue_depth", ()) in samples
    for status in ("queued", "running", "succeeded", "failed", "cancelled", "interrupted"):
        assert ("pixart_jobs", (("status", status),)) in samples
    assert samples[("pixart_jobs", (("status", "succeeded"),))] >= 1
    assert samples[("pixart_rejections_total", (("reason", "invalid"),))] >= 1
    assert samples[("pixart_step_seconds_count", ())] >= 4
    assert samples[("pixart_job_seconds_count", ())] >= 1
    assert ("pixart_step_seconds_bucket", (("le", "+Inf"),)) in samples
    assert samples[("pixart_out_of_memory_total", ())] == 0


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.put("/v1/jobs"), 405)["code"] == "method_not_allowed"
    assert error_of(client.get("/v1/generations"), 405)["code"] == "method_not_allowed"


# -- --api-key, --host ------------------------------------------------------------------------------------

def keyed_routes(job_id: str, image: str) -> list[tuple[str, str]]:
    return [("POST", "/v1/generations"), ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job_id}"),
            ("DELETE", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"), ("GET", f"/v1/images/{image}"),
            ("GET", "/v1/schema"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json"),
            ("GET", "/docs"), ("GET", "/v1/nothing")]


@pytest.fixture(scope="module")
def keyed_job(keyed) -> dict:
    with keyed.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        job = submit(client, {"prompt": "a purple circle", "seed": 21, "num_inference_steps": 5})
        return wait_for_job(client, job["id"], timeout=60)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Bearer {API_KEY}x", f"Basic {API_KEY}",
                                           API_KEY, "Bearer", f"bearer{API_KEY}"])
def test_api_key_is_required_on_every_route_but_healthz(keyed, keyed_job, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    with keyed.client(headers=headers) as client:
        for method, path in keyed_routes(keyed_job["id"], keyed_job["images"][0]["name"]):
            body = {"json": {"prompt": "a fox", **FAST}} if method == "POST" else {}
            response = client.request(method, path, **body)
            error = error_of(response, 401)
            assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key", path
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/healthz").status_code == 200


def test_the_right_api_key_opens_every_route(keyed, keyed_job):
    with keyed.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        expected = {"/v1/generations": 422, f"/v1/jobs/{keyed_job['id']}": 200, "/v1/nothing": 404}
        for method, path in keyed_routes(keyed_job["id"], keyed_job["images"][0]["name"]):
            if method == "POST":
                response = client.post(path, json={"prompt": ""})
            elif method == "DELETE":
                response = client.delete(path)
                assert response.status_code == 409
                continue
            else:
                response = client.request(method, path)
            assert response.status_code == expected.get(path, 200), (path, response.text[:300])
        assert client.get("/healthz").status_code == 200


def test_same_pixels_as_the_library(keyed, keyed_job):
    from pixart_sigma import PixArtSigmaModel

    with keyed.client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        served = client.get(keyed_job["images"][0]["url"]).content
    model = PixArtSigmaModel(model_name="demo", seed=21, num_inference_steps=5)
    (expected,) = model.generate("a purple circle")
    with Image.open(io.BytesIO(served)) as png:
        assert png.size == expected.size
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_a_non_loopback_host_without_an_api_key_refuses_to_start(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PIXART_SIGMA_API_KEY"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-m", "pixart_sigma", "serve", "--host", "0.0.0.0", "--port",
                             str(free_port()), "--data-dir", str(tmp_path / "data"), "--model-name", "demo"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "0.0.0.0" in result.stderr and "--api-key" in result.stderr and "PIXART_SIGMA_API_KEY" in result.stderr
    assert not (tmp_path / "data" / "jobs.sqlite3").exists()  # refused before anything was made
