"""No accepted job or image is lost: a start that cannot bind, a full disk (at submission and while a job
ends), a kill while images are written, a damaged store, retention racing the requests that wait.

The full disk is injected by tests/fault_server.py (the real service, with the store's writes failing as
SQLite's do and image writes failing with ENOSPC while a trigger file exists).
"""

import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest

from pixart_sigma.server.store import JobStore
from serving import free_port, start_server, wait_for_job, wait_until

SERVE = [sys.executable, "-m", "pixart_sigma", "serve", "--model-name", "demo"]


def queue_one(data_dir, prompt="a red circle"):
    """A job left queued in the store, as a stopped server leaves it."""
    store = JobStore(data_dir)
    try:
        settings = {"num_inference_steps": 1, "seed": 3, "num_images_per_prompt": 1}
        return store.add("demo", prompt, settings, [3]).id
    finally:
        store.close()


def status_in_store(data_dir, job_id):
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        return db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def test_a_taken_port_fails_at_once_and_leaves_the_queue_as_it_was(tmp_path):
    data = tmp_path / "data"
    job_id = queue_one(data)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*SERVE, "--port", str(port), "--data-dir", str(data)], capture_output=True,
                                text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert f"error: port={port} on 127.0.0.1 cannot be used" in result.stderr and "--port 0" in result.stderr
    assert "pixart-sigma serving" not in result.stderr and "Traceback" not in result.stderr
    assert "loading" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert status_in_store(data, job_id) == "queued"
    server = start_server(data)  # the next start runs it
    try:
        assert wait_for_job(server.client(), job_id)["status"] == "succeeded"
    finally:
        server.stop()


def test_port_0_serves_on_the_port_the_system_chose_and_says_which(tmp_path):
    log = tmp_path / "log"
    with open(log, "wb") as stream:
        process = subprocess.Popen([*SERVE, "--port", "0", "--data-dir", str(tmp_path / "data")], stdout=stream,
                                   stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = wait_until(lambda: re.search(r"serving demo on http://127\.0\.0\.1:([0-9]+)/", log.read_text()), 120)
        port = int(line[1])
        assert port != 0
        assert wait_until(lambda: _ready(f"http://127.0.0.1:{port}"), 60)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def _ready(url):
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def full_disk(tmp_path):
    trigger = tmp_path / "disk-full"
    server = start_server(tmp_path / "data", faults=True, env={"PIXART_FAULT_DISK_FULL": str(trigger)})
    yield server, trigger
    trigger.unlink(missing_ok=True)
    server.stop()


def test_a_full_disk_at_submission_is_503_in_each_routes_shape_and_readyz_says_so(full_disk):
    server, trigger = full_disk
    client = server.client()
    assert client.get("/readyz").status_code == 200
    trigger.touch()
    ours = client.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 1})
    openai = client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 1})
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
    for response in (ours, openai, a1111):
        assert response.status_code == 503 and response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "store_unwritable"
        assert "could not be stored" in response.json()["error"]["message"]
    assert "could not be stored" in a1111.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "store_unwritable"
    assert client.get("/v1/jobs").status_code == 200  # reading still works
    trigger.unlink()
    assert wait_until(lambda: client.get("/readyz").status_code == 200, 10)
    assert client.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 1}).status_code == 202


def test_a_full_disk_as_a_job_ends_fails_it_for_its_clients_and_leaves_no_orphan(full_disk):
    server, trigger = full_disk
    client = server.client()
    answers = []

    def openai():  # a client waiting for its images while the disk fills
        answers.append(client.post("/v1/images/generations", json={"prompt": "[untilfull] a red circle",
                                                                   "num_inference_steps": 6}, timeout=60))

    waiting = threading.Thread(target=openai)
    waiting.start()
    job = wait_until(lambda: next((job for job in client.get("/v1/jobs").json()["jobs"]
                                   if job["status"] == "running"), None), 30)
    trigger.touch()
    waiting.join(60)
    assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert answers[0].json()["error"]["code"] == "store_unwritable" and answers[0].headers["retry-after"].isdigit()
    ended = client.get(f"/v1/jobs/{job['id']}").json()
    assert ended["status"] == "failed" and "could not be" in ended["error"] and ended["images"] == []
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409  # it has ended
    images = server.data_dir / "images"
    assert [path.name for path in images.iterdir()] == []  # no image that no job lists, no partial file
    trigger.unlink()
    assert server.stop() == 0
    with sqlite3.connect(server.data_dir / "jobs.sqlite3") as db:  # rows and files agree after the stop
        status, names = db.execute("SELECT status, images FROM jobs WHERE id = ?", (job["id"],)).fetchone()
    assert json.loads(names) == [] and status == "failed"  # recorded once the disk had room again


def test_a_kill_while_images_are_written_keeps_the_written_ones_listed_and_no_partial_file(tmp_path):
    server = start_server(tmp_path / "data", faults=True)
    images = server.data_dir / "images"
    try:
        job = server.client().post("/v1/generations", json={"prompt": "[slowsave] a red circle",
                                                             "num_inference_steps": 1, "num_images_per_prompt": 8,
                                                             "seed": 1}).json()
        wait_until(lambda: len([p for p in images.iterdir() if p.suffix == ".png"]) >= 3, 60, interval=0.01)
    finally:
        server.stop(signal.SIGKILL)
    (images / ".partial-0123456789abcdef.png").write_bytes(b"")  # as a kill inside a write leaves one
    restarted = start_server(tmp_path / "data")
    try:
        after = restarted.client().get(f"/v1/jobs/{job['id']}").json()
        assert after["status"] == "interrupted"
        listed = {image["name"] for image in after["images"]}
        assert 2 <= len(listed) < 8  # the third file's row may not have been written: then it is moved aside
        assert {path.name for path in images.iterdir()} == listed  # nothing unlisted, nothing partial
        for image in after["images"]:
            assert restarted.client().get(image["url"]).status_code == 200
    finally:
        restarted.stop()


def test_the_start_moves_unlisted_files_aside_and_removes_partial_files_and_links(tmp_path):
    data = tmp_path / "data"
    images = data / "images"
    images.mkdir(parents=True)
    stray = images / f"{'a' * 32}-0.png"
    stray.write_bytes(b"not listed by any job")
    (images / ".partial-feedfacefeedface.png").write_bytes(b"")
    (images / f"{'b' * 32}-0.png").symlink_to("/etc/passwd")
    (images / ".partial-a-folder").mkdir()  # not a file we write: moved aside, not deleted
    server = start_server(data)
    try:
        assert list(images.iterdir()) == []
        assert (data / "unlisted-images" / stray.name).read_bytes() == b"not listed by any job"
        assert (data / "unlisted-images" / ".partial-a-folder").is_dir()
        assert "2 file(s) that no job lists moved to" in server.output()
        assert "2 partial file(s) or link(s) removed" in server.output()
        assert os.path.exists("/etc/passwd")
    finally:
        server.stop()


def test_a_link_planted_among_the_images_is_not_followed(tmp_path):
    server = start_server(tmp_path / "data")
    try:
        client = server.client()
        job = wait_for_job(client, client.post("/v1/generations", json={"prompt": "a red circle",
                                                                        "num_inference_steps": 1}).json()["id"])
        planted = server.data_dir / "images" / f"{'c' * 32}-0.png"
        planted.symlink_to("/etc/passwd")
        assert client.get(f"/v1/images/{planted.name}").status_code == 404
        fifo = server.data_dir / "images" / f"{'d' * 32}-0.png"
        os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
        for _ in range(10):  # more than the threads that read images
            assert client.get(f"/v1/images/{fifo.name}", timeout=5).status_code == 404
        assert client.get("/readyz", timeout=5).status_code == 200
        real = client.get(job["images"][0]["url"])
        head = client.head(job["images"][0]["url"])
        assert real.status_code == head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(real.content)
        assert head.headers["content-type"] == "image/png"
    finally:
        server.stop()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_that_is_not_a_database_is_refused_at_start_with_what_to_do(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = data / "jobs.sqlite3"
    store.write_bytes(os.urandom(64 * 1024))
    before = _digest(store)
    result = subprocess.run([*SERVE, "--port", str(free_port()), "--data-dir", str(data)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the job store {store} cannot be used" in result.stderr and "move it aside" in result.stderr
    assert "images folder beside it is kept" in result.stderr
    assert _digest(store) == before and not (data / "jobs.sqlite3-wal").exists()


def test_a_store_with_damaged_pages_is_refused_and_never_written(tmp_path):
    data = tmp_path / "data"
    store = JobStore(data)
    for k in range(300):
        store.add("demo", f"a red circle {k} " + "x" * 200, {"seed": k}, [k])
    store.close()
    path = data / "jobs.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    raw = bytearray(path.read_bytes())
    for page in (3, 7, 11):  # table and index pages in the middle of the file
        raw[page * page_size + 8: page * page_size + 200] = os.urandom(192)
    path.write_bytes(bytes(raw))
    before = _digest(path)
    result = subprocess.run([*SERVE, "--port", str(free_port()), "--data-dir", str(data)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(rf"the job store {re.escape(str(path))} (is damaged|cannot be used)", result.stderr)
    assert "nothing was written to it" in result.stderr and "loading" not in result.stderr
    assert _digest(path) == before


def test_retention_keeps_what_requests_wait_for(tmp_path):
    server = start_server(tmp_path / "data", "--model-name", "demo", "--keep-jobs", "1", "--keep-grace", "0")
    try:
        client = server.client()
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1, "n_iter": 2,
                                                          "seed": 5})
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 2
    finally:
        server.stop()


def test_urls_just_handed_out_stay_within_the_grace_period(tmp_path):
    server = start_server(tmp_path / "data", "--model-name", "demo", "--keep-jobs", "1")
    try:
        client = server.client()
        answers = []

        def ask(k):
            answers.append(client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": k,
                                                                        "num_inference_steps": 1}, timeout=60))

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        for answer in answers:
            assert httpx.get(answer.json()["data"][0]["url"], timeout=10).status_code == 200
    finally:
        server.stop()


def test_the_start_refuses_when_the_place_for_unlisted_files_is_taken_by_a_file(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / f"{'a' * 32}-0.png").write_bytes(b"stray")
    (data / "unlisted-images").write_bytes(b"a file, not a folder")
    result = subprocess.run([*SERVE, "--port", str(free_port()), "--data-dir", str(data)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{data / 'unlisted-images'} is not a folder: move it away" in result.stderr


def test_a_key_whose_job_failed_for_storage_makes_a_new_job_once_there_is_room(full_disk):
    server, trigger = full_disk
    client = server.client()
    body = {"prompt": "[untilfull] a red circle", "num_inference_steps": 6}
    headers = {"Idempotency-Key": "retry-me"}
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(
        client.post("/v1/images/generations", json=body, headers=headers, timeout=60)))
    waiting.start()
    wait_until(lambda: any(job["status"] == "running" for job in client.get("/v1/jobs").json()["jobs"]), 30)
    trigger.touch()
    waiting.join(60)
    assert answers[0].status_code == 503
    failed_id = next(job["id"] for job in client.get("/v1/jobs").json()["jobs"])
    trigger.unlink()
    assert wait_until(lambda: client.get("/readyz").status_code == 200, 10)
    retried = wait_until(lambda: (lambda r: r if r.status_code != 503 else None)(
        client.post("/v1/images/generations", json={**body, "num_inference_steps": 6}, headers=headers, timeout=60)), 30)
    assert retried.status_code == 200, retried.text  # what Retry-After promised
    assert retried.json()["job_id"] != failed_id and "Idempotent-Replayed" not in retried.headers
    replay = client.post("/v1/images/generations", json=body, headers=headers, timeout=60)
    assert replay.json()["job_id"] == retried.json()["job_id"]  # the new job owns the key now


def test_a_txt2img_refused_half_way_can_be_retried_with_the_same_key(tmp_path):
    server = start_server(tmp_path / "data", "--model-name", "demo", "--queue-size", "1", faults=True)
    try:
        client = server.client()
        busy = client.post("/v1/generations", json={"prompt": "[slow] busy", "num_inference_steps": 10}).json()
        wait_until(lambda: client.get(f"/v1/jobs/{busy['id']}").json()["status"] == "running", 30)
        key = {"Idempotency-Key": "k" * 200}  # the longest key: each batch's derived key must still work
        body = {"prompt": "a red circle", "steps": 1, "n_iter": 2, "seed": 5}
        refused = client.post("/sdapi/v1/txt2img", json=body, headers=key)
        assert refused.status_code == 429  # batch 2 found the queue full; batch 1 was withdrawn
        wait_for_job(client, busy["id"])
        retried = client.post("/sdapi/v1/txt2img", json=body, headers=key)
        assert retried.status_code == 200, retried.text
        assert len(retried.json()["images"]) == 2 and json.loads(retried.json()["info"])["interrupted"] is False
    finally:
        server.stop()


def test_an_image_handed_out_stays_for_the_grace_period_from_then(tmp_path):
    grace = 3
    server = start_server(tmp_path / "data", "--model-name", "demo", "--keep-jobs", "1", "--keep-grace", str(grace))
    try:
        client = server.client()

        def run(prompt):
            return wait_for_job(client, client.post("/v1/generations", json={"prompt": prompt,
                                                                              "num_inference_steps": 1}).json()["id"])

        def gone(url):
            return client.get(url).status_code == 404

        never_shown, shown_late = run("a blue square"), run("a red circle")
        time.sleep(grace + 0.5)  # both past the grace from their end
        url = client.get(f"/v1/jobs/{shown_late['id']}").json()["images"][0]["url"]  # handed out now
        run("a green circle")  # its end prunes what retention may delete
        assert wait_until(lambda: gone(never_shown["images"][0]["url"]), 10)  # retention did run
        assert client.get(url).status_code == 200  # but the URL had just gone out
        time.sleep(grace + 0.5)
        run("a yellow triangle")
        assert wait_until(lambda: gone(url), 10)  # once the grace had passed, it went
    finally:
        server.stop()


def test_a_data_folder_whose_name_has_url_characters_opens_its_own_store(tmp_path):
    data = tmp_path / "odd #name? 100%" / "data"
    store = JobStore(data)
    job_id = store.add("demo", "a red circle", {"seed": 1}, [1]).id
    store.close()
    store = JobStore(data)  # the check at start reads this very file, read-only
    try:
        assert store.get(job_id).prompt == "a red circle"
    finally:
        store.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["odd #name? 100%"]  # nothing made elsewhere
