"""Scenarios for `pixart-sigma serve` under load and faults, against real processes (tests/fault_server.py).

A prompt containing [slow] takes 0.2 s a step and one containing [oom] raises torch.OutOfMemoryError at
step 1; everything else is the real CLI and service. Traffic goes to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import io
import signal
import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from serving import start_server, wait_for_job, wait_until

pytestmark = pytest.mark.slow


# -- helpers -----------------------------------------------------------------------------------------------

def submit(client: httpx.Client, body: dict, expect: int = 202) -> dict:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == expect, response.text
    return response.json()


def status_of(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def wait_running(client: httpx.Client, job_id: str, step: int = 1, timeout: float = 30) -> dict:
    return wait_until(lambda: (job := status_of(client, job_id))["status"] == "running"
                      and job["progress"]["step"] >= step and job, timeout)


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError(f"{name}{labels} not in /metrics")


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def library():
    """The same demo model in this process, to compare pixels with what the service made."""
    from pixart_sigma import PixArtSigmaModel

    model = PixArtSigmaModel(model_name="demo")

    def generate(job: dict) -> list[np.ndarray]:
        settings = {**job["settings"], "seed": job["seeds"][0]}
        return [np.asarray(image.convert("RGB")) for image in model.generate(job["prompt"], **settings)]

    return generate


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One worker, --queue-size 8: scenarios 1-3 and the fuzzing share it (each leaves the queue empty)."""
    server = start_server(tmp_path_factory.mktemp("faults") / "data", "--model-name", "demo", "--queue-size", "8",
                          faults=True)
    yield server
    server.stop(signal.SIGKILL)


# -- (1) overload ------------------------------------------------------------------------------------------

def test_20_concurrent_clients_against_a_queue_of_8_get_9_jobs_and_11_immediate_429(server, client):
    clients = [httpx.Client(base_url=server.url, timeout=30) for _ in range(20)]
    results: list = [None] * 20
    barrier = threading.Barrier(20, timeout=30)

    def one(index: int) -> None:
        try:
            clients[index].get("/healthz")  # connected before the start line
            barrier.wait()
            response = clients[index].post("/v1/generations", json={"prompt": f"[slow] crowd {index}",
                                                                   "num_inference_steps": 5, "seed": index})
            results[index] = (response.status_code, response.headers, response.json(), time.time())
        except Exception as exc:  # recorded, asserted below
            results[index] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(20)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for c in clients:
            c.close()
    assert all(isinstance(result, tuple) for result in results), results
    statuses = sorted(result[0] for result in results)
    assert not [s for s in statuses if s >= 500], statuses
    accepted = [result for result in results if result[0] == 202]
    refused = [result for result in results if result[0] == 429]
    assert (len(accepted), len(refused)) == (9, 11), statuses
    for status, headers, body, _ in refused:
        assert int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
    jobs = [wait_for_job(client, body["id"], timeout=120) for _, _, body, _ in accepted]
    assert [job["status"] for job in jobs] == ["succeeded"] * 9
    # Valid only if every request was answered while the first job still ran (else the queue had room again).
    first_finished = min(job["finished"] for job in jobs)
    assert max(result[3] for result in results) < first_finished
    assert metric(client, "pixart_rejections_total", reason="queue_full") == 11
    assert metric(client, "pixart_queue_depth") == 0


# -- (2) cancel mid-job ------------------------------------------------------------------------------------

def test_cancel_mid_job_stops_within_a_step_and_the_next_job_runs(client):
    running = submit(client, {"prompt": "[slow] to be cancelled", "num_inference_steps": 20, "seed": 1})
    following = submit(client, {"prompt": "after the cancel", "num_inference_steps": 3, "seed": 2})
    seen = wait_running(client, running["id"], step=5, timeout=60)["progress"]["step"]
    started = time.monotonic()
    response = client.delete(f"/v1/jobs/{running['id']}")
    assert response.status_code == 202
    job = wait_until(lambda: (j := status_of(client, running["id"]))["status"] != "running" and j, 5, interval=0.02)
    elapsed = time.monotonic() - started
    assert job["status"] == "cancelled" and job["images"] == []
    assert seen <= job["progress"]["step"] <= seen + 2  # the step in flight finishes, no other starts
    assert job["error"] == f"cancelled at step {job['progress']['step']} of 20"
    assert elapsed < 1.5, elapsed  # a step is 0.2 s
    assert wait_for_job(client, following["id"], timeout=60)["status"] == "succeeded"


# -- (3) out of memory -------------------------------------------------------------------------------------

def test_out_of_memory_fails_that_job_only(client):
    before = metric(client, "pixart_out_of_memory_total")
    failed = wait_for_job(client, submit(client, {"prompt": "[oom] too big", "num_inference_steps": 5})["id"], 60)
    assert failed["status"] == "failed" and failed["images"] == []
    assert "out of memory" in failed["error"] and "smaller" in failed["error"]
    assert "Traceback" not in failed["error"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    after = wait_for_job(client, submit(client, {"prompt": "fine again", "num_inference_steps": 2, "seed": 3})["id"], 60)
    assert after["status"] == "succeeded" and len(after["images"]) == 1
    assert metric(client, "pixart_out_of_memory_total") == before + 1 == 1
    assert metric(client, "pixart_jobs", status="failed") >= 1


# -- (4) kill -9 and restart -------------------------------------------------------------------------------

def test_kill_9_during_a_job_keeps_history_marks_it_interrupted_and_runs_the_queued_ones(tmp_path, library):
    data = tmp_path / "data"
    server = start_server(data, "--model-name", "demo", faults=True)
    try:
        with server.client() as client:
            done = wait_for_job(client, submit(client, {"prompt": "kept", "num_inference_steps": 2, "seed": 5})["id"])
            assert done["status"] == "succeeded"
            image = client.get(done["images"][0]["url"]).content
            running = submit(client, {"prompt": "[slow] killed", "num_inference_steps": 50, "seed": 6})
            queued = [submit(client, {"prompt": "queued one", "num_inference_steps": 3}),  # seed drawn now
                      submit(client, {"prompt": "queued two", "num_inference_steps": 3, "seed": 8,
                                      "num_images_per_prompt": 2})]
            wait_running(client, running["id"], step=2)
    finally:
        server.stop(signal.SIGKILL)
    assert server.process.returncode == -signal.SIGKILL

    restarted = start_server(data, "--model-name", "demo", faults=True)
    try:
        with restarted.client() as client:
            assert status_of(client, done["id"]) == {**done, "progress": {"step": 2, "total": 2}}
            assert client.get(done["images"][0]["url"]).content == image
            interrupted = status_of(client, running["id"])
            assert interrupted["status"] == "interrupted" and interrupted["images"] == []
            assert "stopped while this job was running" in interrupted["error"]
            assert interrupted["finished"] is not None
            assert error_code(client.delete(f"/v1/jobs/{running['id']}")) == (409, "job_finished")
            for job in queued:
                after = wait_for_job(client, job["id"], timeout=60)
                assert after["status"] == "succeeded", after
                assert after["seeds"] == job["seeds"] and after["settings"] == job["settings"]
                served = [pixels(client.get(item["url"]).content) for item in after["images"]]
                expected = library(job)
                assert len(served) == len(expected) == job["settings"]["num_images_per_prompt"]
                for got, want in zip(served, expected):
                    assert np.array_equal(got, want)
            events = client.get(f"/v1/jobs/{done['id']}/events").text  # no progress in memory after a restart
            assert events.startswith("event: done\n") and events.count("event:") == 1
    finally:
        restarted.stop(signal.SIGKILL)


def error_code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


# -- (5) SIGTERM drains ------------------------------------------------------------------------------------

def test_sigterm_drains_finishes_the_running_job_and_keeps_the_queued_ones(tmp_path):
    data = tmp_path / "data"
    server = start_server(data, "--model-name", "demo", faults=True)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            running = submit(client, {"prompt": "[slow] finishing", "num_inference_steps": 12, "seed": 1})
            queued = [submit(client, {"prompt": f"waits {k}", "num_inference_steps": 2, "seed": 10 + k})
                      for k in range(2)]
            wait_running(client, running["id"], step=1)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            wait_until(lambda: client.get("/readyz").status_code == 503, 1, interval=0.01)
            assert time.monotonic() - signalled < 1
            assert client.get("/readyz").json() == {"status": "draining"}
            response = client.post("/v1/generations", json={"prompt": "too late", "num_inference_steps": 2})
            assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
            assert int(response.headers["retry-after"]) >= 1
            assert client.get("/healthz").status_code == 200
            assert status_of(client, running["id"])["status"] == "running"  # still working while draining
        assert server.process.wait(60) == 0, server.output()[-3000:]
    finally:
        server.stop(signal.SIGKILL)

    with sqlite3.connect(f"file:{data / 'jobs.sqlite3'}?mode=ro", uri=True) as db:
        rows = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert rows[running["id"]] == "succeeded"
    assert [rows[job["id"]] for job in queued] == ["queued", "queued"]

    restarted = start_server(data, "--model-name", "demo", faults=True)
    try:
        with restarted.client() as client:
            assert wait_for_job(client, running["id"])["status"] == "succeeded"
            assert len(client.get(status_of(client, running["id"])["images"][0]["url"]).content) > 0
            for job in queued:
                assert wait_for_job(client, job["id"], timeout=60)["status"] == "succeeded"
    finally:
        assert restarted.stop(signal.SIGTERM) == 0


# -- (6) fuzzing every route from /openapi.json ------------------------------------------------------------

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.openapi.checks import RejectedPositiveData  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402

FUZZ_EXAMPLES = 25
HOLD = {"prompt": "[slow] hold the worker while fuzzing", "num_inference_steps": 200, "seed": 0}
# Rules JSON Schema cannot state (across fields, or on characters): a schema-valid body may break them, and
# 422 is then the right answer. Any other 422 to a schema-valid request is a mismatch and fails the test.
SEMANTIC_RULES = ("is over the budget", "is too large for", "is empty", "contains the control character",
                  "contains invalid UTF-8", "are the same setting with different values",
                  "must be a multiple of 8",  # inside OpenAI's size string, where a JSON Schema cannot say it
                  # an edit's pictures: what a schema cannot say of a file's bytes, or of a mask beside its image
                  "is not valid base64", "is not an image Pillow can read", "cannot be read as an image",
                  "is truncated or damaged", "has no fully transparent pixel", "has no transparency",
                  "must have the picture's size", "marks nothing to repaint", "apply to inpainting: give a mask",
                  "the masked area starts from the original picture", "would stretch the", "canvas gives",
                  "apply to edits only",
                  # a LoRA name: whether the served LoRA folder holds it (or exists at all) is no schema's to say,
                  # nor whether an A1111 prompt's text holds a LoRA tag (<lora:NAME:SCALE>)
                  "is not in this server's LoRA folder", "is not valid here: name a LoRA",
                  "is ambiguous: this server's LoRA folder", "a LoRA tag without its closing", "prompt: the tag ",
                  "holds the LoRA tag")


class Holder:
    """Keeps a [slow] job running, so fuzzed jobs only wait in the queue; each one is cancelled at once."""

    def __init__(self, client: httpx.Client):
        self.client, self.job_id = client, None

    def ensure(self) -> None:
        if self.job_id is None or status_of(self.client, self.job_id)["status"] != "running":
            self.job_id = submit(self.client, HOLD)["id"]
            wait_running(self.client, self.job_id, step=0, timeout=30)

    def cancel_others(self) -> None:
        jobs = self.client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
        for job in jobs:
            if job["status"] in ("queued", "running") and job["id"] != self.job_id:
                self.client.delete(f"/v1/jobs/{job['id']}")

    def release(self) -> None:
        self.cancel_others()
        if self.job_id is not None:
            self.client.delete(f"/v1/jobs/{self.job_id}")
            wait_for_job(self.client, self.job_id, timeout=30)


def semantic_rejection(response) -> bool:
    if response.status_code not in (400, 422):
        return False
    try:
        fields = response.json()["error"].get("fields") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    messages = [message for problems in fields.values() for message in problems]
    return bool(messages) and all(any(rule in message for rule in SEMANTIC_RULES) for message in messages)


def test_fuzz_every_route(server, client):
    """Every operation of the server's own /openapi.json, positive and negative data: no 5xx, nothing off-spec."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    schema.config.update(base_url=server.url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {
        ("POST", "/v1/generations"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/events"), ("GET", "/v1/images/{name}"), ("GET", "/v1/schema"), ("GET", "/healthz"),
        ("GET", "/readyz"), ("GET", "/metrics")}
    holder = Holder(client)
    failures: dict[str, str] = {}
    try:
        for operation in operations:
            strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
            if operation.path_parameters or operation.query or operation.body:
                strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))

            @given(case=st.one_of(strategies))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None, print_blob=False)
            def check(case):
                generates = case.method == "POST"
                if generates:
                    holder.ensure()
                try:
                    if case.path.endswith("/events"):  # a stream: check the status only
                        response = case.call(base_url=server.url, timeout=10)
                        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
                        return
                    try:
                        response = case.call(base_url=server.url, timeout=3)
                    except Exception as exc:  # a route that waits for its job: accepted, queued, nothing to check
                        if generates and "timed out" in str(exc).lower():
                            return
                        raise
                    try:
                        case.validate_response(response)
                    except FailureGroup as group:
                        if not (all(isinstance(f, RejectedPositiveData) for f in group.exceptions)
                                and semantic_rejection(response)):
                            raise
                finally:
                    if generates:
                        holder.cancel_others()

            try:
                check()
            except BaseException as exc:  # collect, so one operation's failure does not hide another's
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                failures[f"{operation.method.upper()} {operation.path}"] = str(exc)[:1500]
    finally:
        holder.release()
    assert not failures, "\n\n".join(f"== {name}\n{text}" for name, text in failures.items())
