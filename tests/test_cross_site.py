"""Other web pages can do nothing: a page on another site, open in the same browser, cannot change the
service's state (no-cors fetches, forms, any method, any body) and cannot read from it.

The attacker's page is served for real on `localhost` (another site than the service's 127.0.0.1) and
run in Chromium; the same requests are also sent by hand with the headers a browser adds.
"""

from __future__ import annotations

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serving import start_server, wait_for_job, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("cross-site") / "data", faults=True,
                          env={"PIXART_SIGMA_API_KEY": ""})
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def running_job(client):
    job = client.post("/v1/generations", json={"prompt": "[slow] a red circle", "num_inference_steps": 10}).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 30)
    return job


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}])
def test_state_changing_requests_from_another_origin_are_refused_whatever_the_body(client, headers):
    job = running_job(client)
    attempts = [
        client.post("/sdapi/v1/interrupt", headers=headers),  # no body: the content-type rule cannot apply
        client.post("/sdapi/v1/interrupt", headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
                    content=b"a=1"),
        client.delete(f"/v1/jobs/{job['id']}", headers=headers),
        client.post("/v1/generations", headers={**headers, "Content-Type": "application/json"},
                    content=b'{"prompt": "x"}'),
    ]
    for response in attempts:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "cross_origin"
    assert wait_for_job(client, job["id"])["status"] == "succeeded"  # never cancelled


def test_reads_from_another_site_are_refused_but_a_link_to_the_page_opens_it(client):
    assert client.get("/v1/jobs", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}).status_code == 403
    assert client.get("/v1/jobs", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}).status_code == 403
    navigation = client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert navigation.status_code == 200 and "text/html" in navigation.headers["content-type"]


def test_the_pages_own_requests_and_plain_clients_still_work(client, server):
    own = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert client.get("/v1/jobs", headers=own).status_code == 200
    job = running_job(client)
    assert client.delete(f"/v1/jobs/{job['id']}", headers=own).status_code == 202
    assert client.post("/sdapi/v1/interrupt", headers={"Sec-Fetch-Site": "none"}).status_code == 200  # typed in


def test_every_answer_forbids_framing_and_foreign_scripts(client):
    for response in (client.get("/"), client.get("/v1/jobs"), client.get("/nowhere"),
                     client.post("/v1/generations", content=b"x", headers={"Content-Type": "text/plain"})):
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"


@pytest.fixture(scope="module")
def attacker_site(tmp_path_factory):
    """A real web server on another site (localhost, not 127.0.0.1) whose page attacks the service."""
    root = tmp_path_factory.mktemp("attacker")
    (root / "index.html").write_text("<!doctype html><title>a page elsewhere</title><p>hello</p>")
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}")
def test_a_page_on_another_site_cannot_interrupt_cancel_or_queue_in_chromium(client, server, attacker_site):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(attacker_site)
            own = browser.new_page()
            own.goto(server.url + "/")
            queued_before = client.get("/v1/jobs").json()["total"]
            job = client.post("/v1/generations", json={"prompt": "[slow] a red circle",
                                                       "num_inference_steps": 100}).json()  # 20 s: outlives the test
            wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 30)
            results = page.evaluate("""async ([target, jobId]) => {
                const tries = [
                    fetch(target + "/sdapi/v1/interrupt", {method: "POST", mode: "no-cors"}),
                    fetch(target + "/sdapi/v1/interrupt", {method: "POST", mode: "no-cors",
                          headers: {"Content-Type": "application/x-www-form-urlencoded"}, body: "a=1"}),
                    fetch(target + "/v1/generations", {method: "POST", mode: "no-cors",
                          headers: {"Content-Type": "text/plain"}, body: '{"prompt": "from elsewhere"}'}),
                    fetch(target + "/v1/jobs/" + jobId, {method: "DELETE"}),
                    fetch(target + "/v1/jobs"),
                ];
                return Promise.all(tries.map((t) => t.then((r) => r.type + " " + r.status, (e) => "refused " + e)));
            }""", [server.url, job["id"]])
            assert len(results) == 5  # no-cors answers are opaque to the page; the effect is what counts
            after = client.get(f"/v1/jobs/{job['id']}").json()
            assert after["status"] == "running" and not after["error"]  # the foreign page changed nothing
            # Same browser, the service's own page: the same interrupt works, so the refusal was the rule's.
            status = own.evaluate("async () => (await fetch('/sdapi/v1/interrupt', {method: 'POST'})).status")
            assert status == 200
            assert wait_for_job(client, job["id"])["status"] == "cancelled"
        finally:
            browser.close()
    jobs = client.get("/v1/jobs", params={"limit": 100}).json()
    assert jobs["total"] == queued_before + 1  # only the test's own job
    assert all(job["prompt"] != "from elsewhere" for job in jobs["jobs"])


def test_the_loopback_address_served_is_a_host_name_it_answers_to(tmp_path):
    server = start_server(tmp_path / "data", "--model-name", "demo", "--host", "127.0.0.2",
                          env={"PIXART_SIGMA_API_KEY": ""}, wait_ready=False)
    try:
        url = server.url.replace("127.0.0.1", "127.0.0.2")
        wait_until(lambda: _answers(url + "/readyz") == 200, 120)
        assert _answers(url + "/") == 200
        assert _answers(url + "/v1/jobs", {"Host": "attacker.example"}) == 421
    finally:
        server.stop()


def _answers(url, headers=None):
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code
    except httpx.HTTPError:
        return None
