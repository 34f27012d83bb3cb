"""The service against what a review found: odd JSON types, deep JSON, huge offsets, cross-site and
rebinding requests, two servers on one folder, jobs for a model no longer served."""

import sqlite3
import subprocess
import sys

import httpx
import pytest

from serving import start_server, wait_for_job


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("hardening") / "data")
    yield server
    server.stop()


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "model_name": []}, "model_name"), ({"prompt": "x", "model_name": {"a": 1}}, "model_name"),
    ({"prompt": "x", "self": 1}, "self"), ({"prompt": "x", "prompt_": 1}, "prompt_"),
])
def test_odd_json_types_are_422_naming_the_field(client, body, field):
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422 and field in response.json()["error"]["fields"]


@pytest.mark.parametrize("path, body", [
    ("/v1/images/generations", {"prompt": "x", "model": []}),
    ("/sdapi/v1/txt2img", {"prompt": "x", "scheduler": []}),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": []}}),
])
def test_compatible_routes_refuse_odd_types_without_a_5xx(client, path, body):
    response = client.post(path, json=body)
    assert 400 <= response.status_code < 500 and "error" in response.json()


def test_deeply_nested_json_is_400(client):
    body = b"[" * 200_000 + b"]" * 200_000
    response = client.post("/v1/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_a_huge_cursor_is_422(client):
    response = client.get("/v1/jobs", params={"before": f"{2**64}_{'0' * 32}"})
    assert response.status_code == 422 and "before" in response.json()["error"]["fields"]


def test_a_cross_site_form_post_is_refused(client):
    response = client.post("/v1/generations", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert client.post("/sdapi/v1/interrupt").status_code == 200  # an empty POST, as A1111 clients send it


def test_a_rebinding_host_name_is_refused_without_a_key(server):
    response = httpx.get(server.url + "/v1/jobs", headers={"Host": "attacker.example"}, timeout=10)
    assert response.status_code == 421
    assert httpx.get(server.url.replace("127.0.0.1", "localhost") + "/healthz", timeout=10).status_code == 200


def test_images_are_cached_privately(client):
    job = wait_for_job(client, client.post("/v1/generations", json={"prompt": "a red circle",
                                                                    "num_inference_steps": 2}).json()["id"])
    response = client.get(job["images"][0]["url"])
    assert response.headers["cache-control"].startswith("private")


def test_a_second_server_on_the_same_folder_is_refused(server):
    result = subprocess.run([sys.executable, "-m", "pixart_sigma", "serve", "--model-name", "demo", "--port", "1",
                             "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "in use by another pixart-sigma server" in result.stderr


def test_a_queued_job_for_a_model_no_longer_served_fails_with_the_reason(tmp_path):
    first = start_server(tmp_path / "data")
    try:
        job_id = first.client().post("/v1/generations", json={"prompt": "x"}).json()["id"]
        wait_for_job(first.client(), job_id)
    finally:
        assert first.stop() == 0
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:  # as if it had been queued for another model
        db.execute("UPDATE jobs SET status = 'queued', model_name = 'gone' WHERE id = ?", (job_id,))
    second = start_server(tmp_path / "data")
    try:
        job = second.client().get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and "'gone' is no longer served" in job["error"]
    finally:
        second.stop()


@pytest.mark.parametrize("flags, fragment", [(["--queue-size", "0"], "queue_size=0 is not valid: from 1 to 10000"),
                                             (["--port", "70000"], "port=70000 is not valid")])
def test_serve_flags_out_of_range_exit_2_before_loading(tmp_path, flags, fragment):
    result = subprocess.run([sys.executable, "-m", "pixart_sigma", "serve", "--model-name", "demo",
                             "--data-dir", str(tmp_path), *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and fragment in result.stderr and "loading" not in result.stderr


def test_keep_jobs_deletes_the_oldest_finished_jobs_and_their_images(tmp_path):
    server = start_server(tmp_path / "data", "--model-name", "demo", "--keep-jobs", "2", "--keep-grace", "0")
    try:
        with server.client() as client:
            jobs = [wait_for_job(client, client.post("/v1/generations", json={
                "prompt": "a red circle", "num_inference_steps": 1, "seed": k}).json()["id"]) for k in range(3)]
            assert client.get(f"/v1/jobs/{jobs[0]['id']}").status_code == 404
            assert not (server.data_dir / "images" / jobs[0]["images"][0]["name"]).exists()
            for job in jobs[1:]:
                assert client.get(job["images"][0]["url"]).status_code == 200
            assert client.get("/v1/jobs").json()["total"] == 2
    finally:
        server.stop()


def test_compile_is_the_operators_choice(client, tmp_path):
    before = client.get("/v1/jobs").json()["total"]
    for path, body in (("/v1/generations", {"prompt": "x", "compile": True}),
                       ("/v1/images/generations", {"prompt": "x", "compile": True}),
                       ("/sdapi/v1/txt2img", {"prompt": "x", "compile": True})):
        response = client.post(path, json=body)
        assert response.status_code in (400, 422) and "compile" in response.json()["error"]["fields"], path
        assert "--allow-compile" in response.json()["error"]["message"]
    assert client.post("/v1/generations", json={"prompt": "x", "compile": False,
                                                "num_inference_steps": 1}).status_code == 202
    assert client.get("/v1/jobs").json()["total"] == before + 1
    allowed = start_server(tmp_path / "data", "--model-name", "demo", "--allow-compile", faults=True)
    try:
        with allowed.client() as other:
            other.post("/v1/generations", json={"prompt": "[slow] x", "num_inference_steps": 20})  # keeps the worker busy
            response = other.post("/v1/generations", json={"prompt": "x", "compile": True})
            assert response.status_code == 202
            other.delete(f"/v1/jobs/{response.json()['id']}")  # accepted; not worth 20 s of compiling here
    finally:
        allowed.stop()


@pytest.mark.parametrize("key", [None, "surrogate-key"])
def test_a_lone_surrogate_is_the_same_422_with_or_without_an_idempotency_key(client, key):
    headers = {"Content-Type": "application/json", **({"Idempotency-Key": key} if key else {})}
    response = client.post("/v1/generations", content=b'{"prompt": "\\ud800 a circle"}', headers=headers)
    assert response.status_code == 422 and "prompt" in response.json()["error"]["fields"]


def test_a_directory_that_is_no_checkpoint_is_named_once(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pixart_sigma", "serve", "--model-name", "/etc", "--port", "0",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("model_name='/etc'") == 1, result.stderr
