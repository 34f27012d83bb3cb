"""The web page at /, in a real browser (Debian's Chromium driven by Playwright) against a real server.

One server for the module, started with the fault hooks so `[slow]` prompts take 0.2 s a step and a test
can watch progress and cancel. Every test's page records its requests (none may leave the server) and
Content-Security-Policy violations (none may happen).
The edit panel's tests pick, drop and paint pictures with the mouse and read what the page sends and what the job
makes. Set PIXART_SIGMA_SCREENSHOT=docs/page.png to write a screenshot of the page with a finished image.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pixart_sigma import picture_sha256, read_mask, read_settings

from serving import start_server, wait_for_job, write_demo_lora

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT_MS = 10_000
NO_KEY = {"PIXART_SIGMA_API_KEY": ""}
API_KEY = "sesame"
PHONE = {"width": 390, "height": 844}
# What the server sends on every answer; the page must work under it.
POLICY = {"default-src": ["'self'"], "script-src": ["'self'"], "style-src": ["'self'"],
          "img-src": ["'self'", "data:", "blob:"], "connect-src": ["'self'"], "font-src": ["'self'"],
          "object-src": ["'none'"], "base-uri": ["'none'"], "form-action": ["'self'"],
          "frame-ancestors": ["'none'"]}
# Run before the page's own script: collects the policy's refusals, which the console alone would hide.
RECORD_VIOLATIONS = """window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => window.cspViolations.push(
    `${e.effectiveDirective} blocked ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber} ${e.sample}`));"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} to drive the page with")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """The page server's LoRA folder: two LoRAs for the demo model and a file that is none."""
    folder = tmp_path_factory.mktemp("page-loras")
    write_demo_lora(folder / "style.safetensors", 1)
    write_demo_lora(folder / "other.safetensors", 2, layout="diffusers")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, lora_dir):
    server = start_server(tmp_path_factory.mktemp("page") / "data", "--model-name", "demo", "--lora-dir", str(lora_dir),
                          faults=True, env=NO_KEY)
    yield server
    server.stop(signal.SIGTERM, timeout=20)


@pytest.fixture(scope="module")
def browser():
    playwright = sync_api.sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
    yield browser
    browser.close()
    playwright.stop()


def new_page(browser, width: int = 1100, height: int = 800):
    """A fresh page that records every request, every script error and every policy violation."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(RECORD_VIOLATIONS)
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    return page


def open_page(browser, url: str, width: int = 1100, height: int = 800, ready: str = "#field-width"):
    """A fresh page (`new_page`) on `url`."""
    page = new_page(browser, width, height)
    page.goto(url + "/")
    page.wait_for_selector(ready, state="attached")  # by default: the form, built from /v1/schema (maybe folded)
    return page


def close_page(page, url: str, also_allowed: tuple[str, ...] = ()):
    try:
        own = (url + "/", f"blob:{url}/")  # blob: URLs the page made of pictures it holds
        outside = [u for u in page.requests if not u.startswith(own + also_allowed)]
        assert not outside, f"requests left the server: {outside}"
        assert not page.errors, f"script errors: {page.errors}"
        assert page.evaluate("() => window.cspViolations") == [], "the page broke its Content-Security-Policy"
    finally:
        page.context.close()


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server.url)
    yield page
    close_page(page, server.url)


@pytest.fixture(scope="module")
def styled_job(server):
    """A finished job with every setting away from its default, made through the API."""
    with server.client() as client:
        response = client.post("/v1/generations", json={
            "prompt": "a red circle on a blue background", "negative_prompt": "blurry", "num_inference_steps": 7,
            "guidance_scale": 3.5, "seed": 1234, "width": 64, "height": 64, "scheduler": "euler",
            "use_resolution_binning": False, "max_sequence_length": 120})
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"], timeout=60)
    assert job["status"] == "succeeded", job
    return job


def gallery_item(page, job_id: str):
    return page.locator(f'#gallery li[data-id="{job_id}"]')


def natural_width(page, selector: str) -> int:
    """The naturalWidth of the first image matching `selector` once it has loaded (looked up afresh each poll,
    since the gallery is redrawn when a job finishes), scrolled to as a person would: the gallery's pictures
    load lazily, and below the settings form they are out of view."""
    return page.wait_for_function(
        "s => { const img = document.querySelector(s); if (img && !img.complete) img.scrollIntoView(); "
        "return img && img.complete && img.naturalWidth; }",
        arg=selector, timeout=WAIT_MS).json_value()


def test_form_is_built_from_the_schema_and_labelled(page, server):
    with server.client() as client:
        schema = client.get("/v1/schema").json()
    for name, prop in schema["properties"].items():
        control = page.get_by_label(prop["title"], exact=True)
        assert control.count() == 1, name
        assert control.get_attribute("name") == name
        assert prop["description"] in page.locator(f'[data-field="{name}"] .help').inner_text()
    width = page.get_by_label(schema["properties"]["width"]["title"], exact=True)
    assert (width.get_attribute("type"), width.get_attribute("min"), width.get_attribute("max"),
            width.get_attribute("step"), width.input_value()) == ("number", "64", "2048", "8", "")
    sampler = page.locator("#field-scheduler")
    assert sampler.evaluate("s => s.tagName") == "SELECT"
    assert sampler.locator("option").all_inner_texts() == schema["properties"]["scheduler"]["enum"]
    assert sampler.locator("option:checked").inner_text() == schema["properties"]["scheduler"]["default"]
    assert page.locator("#field-use_resolution_binning").get_attribute("type") == "checkbox"
    assert page.locator("#field-use_resolution_binning").is_checked()
    assert page.locator("#field-num_inference_steps").input_value() == "20"
    # every control has a <label for>, every button a name; nothing in the page is fetched from elsewhere
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(c => !c.id || !document.querySelector(`label[for="${c.id}"]`)).map(c => c.outerHTML)""")
    assert unlabelled == []
    for button in page.get_by_role("button").all():
        assert (button.get_attribute("aria-label") or button.inner_text()).strip()
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.get_by_role("button", name="Cancel").is_disabled()
    assert page.locator("#settings").evaluate("d => d.open")  # unfolded where there is room


def test_generate_shows_progress_then_the_image(page, server):
    page.get_by_label("Prompt", exact=True).fill("[slow] a green square on a white background")
    page.get_by_label("Inference steps").fill("6")
    page.get_by_role("button", name="Generate").click()
    # the bar moves while the job runs (0.2 s a step), then is full
    page.wait_for_function("() => { const p = document.getElementById('progress'); return p.max === 6 && "
                           "p.value > 0 && p.value < p.max; }", timeout=WAIT_MS)
    page.wait_for_selector('#status[data-state="succeeded"]', timeout=20_000)
    assert page.evaluate("() => { const p = document.getElementById('progress'); return [p.value, p.max]; }") == [6, 6]
    assert natural_width(page, "#result img") == 64
    page.wait_for_selector('#gallery li:first-child[data-status="succeeded"]')
    first = page.locator("#gallery li").first
    assert "[slow] a green square" in first.locator(".prompt").inner_text()
    assert natural_width(page, "#gallery li:first-child img") == 64
    assert "Inferencesteps:6" in "".join(first.locator(".settings").inner_text().split())


def test_image_downloads_and_screenshot(page, server):
    page.get_by_label("Prompt", exact=True).fill("a yellow triangle on a green background")
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector('#status[data-state="succeeded"]', timeout=20_000)
    assert natural_width(page, "#result img") == 64
    link = page.get_by_role("link", name="Download PNG").first
    href, filename = link.get_attribute("href"), link.get_attribute("download")
    assert href.startswith("/v1/images/") and href.endswith(".png") and filename.endswith(".png")
    with page.expect_download(timeout=WAIT_MS) as download:
        link.click()
    assert download.value.suggested_filename == filename
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.wait_for_selector('#gallery li:first-child[data-status="succeeded"]')
    if page.locator("#gallery li img").count() > 1:
        natural_width(page, "#gallery li:nth-child(2) img")  # an older picture too, for the shot
    target = os.environ.get("PIXART_SIGMA_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=target, full_page=True)


def test_clicking_a_gallery_item_fills_the_form(page, server, styled_job):
    page.get_by_role("button", name="Refresh").click()
    item = gallery_item(page, styled_job["id"])
    assert natural_width(page, f'#gallery li[data-id="{styled_job["id"]}"] img') == 64
    settings_text = item.locator(".settings").inner_text()
    assert "1234" in settings_text and "euler" in settings_text
    item.get_by_role("button", name="Use the prompt and settings of: a red circle on a blue background").click()
    values = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#generate-form [name]:not(#edit *)')]
        .map(c => [c.name, c.type === 'checkbox' ? c.checked : c.tagName === 'SELECT' ? c.selectedOptions[0].text
                                                                    : c.value]))""")
    assert values == {"prompt": "a red circle on a blue background", "model_name": "demo", "negative_prompt": "blurry",
                      "num_inference_steps": "7", "guidance_scale": "3.5", "seed": "1234", "width": "64",
                      "height": "64", "num_images_per_prompt": "1", "scheduler": "euler",
                      "use_resolution_binning": False, "max_sequence_length": "120", "vae_tiling": False,
                      "compile": False, "loras": None,  # the LoRA picker (a fieldset): nothing picked
                      "step_cache": "off", "step_cache_threshold": "0.1", "step_cache_interval": "2",
                      "step_cache_warmup": "1", "step_cache_cooldown": "2"}
    assert page.locator('[data-field="loras"] input[type=checkbox]:checked').count() == 0
    assert natural_width(page, "#result img") == 64  # its picture is shown as the result
    page.get_by_role("button", name="Reset settings").click()
    assert page.locator("#field-seed").input_value() == "-1"
    assert page.locator("#field-width").input_value() == ""


def test_queue_position_then_cancel_a_running_job(page, server):
    with server.client() as client:  # a job ahead of the page's, so the page's waits in the queue
        blocker = client.post("/v1/generations", json={"prompt": "[slow] ahead", "num_inference_steps": 100}).json()
        try:
            page.get_by_label("Prompt", exact=True).fill("[slow] a long blue circle")
            page.get_by_label("Inference steps").fill("100")
            page.get_by_role("button", name="Generate").click()
            page.wait_for_selector('#status[data-state="queued"]')
            assert "position 1" in page.locator("#status").inner_text()
            assert page.get_by_role("button", name="Cancel").is_enabled()
        finally:
            client.delete(f"/v1/jobs/{blocker['id']}")
    page.wait_for_function("() => document.getElementById('progress').value >= 1", timeout=WAIT_MS)
    assert "Step" in page.locator("#status").inner_text()
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector('#status[data-state="cancelled"]', timeout=WAIT_MS)
    assert "Cancelled" in page.locator("#status").inner_text()
    assert page.get_by_role("button", name="Cancel").is_disabled()
    page.wait_for_selector('#gallery li:first-child[data-status="cancelled"]')
    first = page.locator("#gallery li").first
    assert first.locator(".badge").inner_text() == "cancelled"
    job_id = first.get_attribute("data-id")
    with server.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_server_errors_show_next_to_their_field(page, server):
    with server.client() as client:
        before = client.get("/v1/jobs?limit=1").json()["total"]
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Width").fill("1001")  # the browser would refuse it; the form is novalidate
    page.get_by_label("Guidance scale").fill("99")
    page.get_by_role("button", name="Generate").click()
    width_error = page.locator('[data-field="width"] .field-error')
    width_error.wait_for()
    assert "multiple of 8" in width_error.inner_text() and "1001" in width_error.inner_text()
    assert page.get_by_label("Width").get_attribute("aria-invalid") == "true"
    assert "from 0.0 to 20.0" in page.locator('[data-field="guidance_scale"] .field-error').inner_text()
    assert page.locator('[data-field="height"] .field-error').inner_text() == ""
    assert page.locator("#general-error").is_hidden()
    page.get_by_label("Width").fill("64")  # editing a field clears its message
    assert width_error.is_hidden()
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_label("Guidance scale").fill("4")
    page.get_by_role("button", name="Generate").click()
    page.locator('[data-field="prompt"] .field-error').wait_for()
    assert "prompt is empty" in page.locator('[data-field="prompt"] .field-error').inner_text().lower()
    with server.client() as client:
        assert client.get("/v1/jobs?limit=1").json()["total"] == before


def test_the_lora_picker_lists_the_folder_sends_the_picked_loras_and_is_refilled_from_a_job(page, server):
    with server.client() as client:
        scale_schema = client.get("/v1/schema").json()["properties"]["loras"]["items"]["properties"]["scale"]
    picker = page.locator('[data-field="loras"]')
    picker.locator('li[data-name="style"]').wait_for()
    assert picker.locator("li").evaluate_all("rows => rows.map(r => r.dataset.name)") == ["broken", "other", "style"]
    broken = picker.locator('li[data-name="broken"]')
    assert "Cannot be used: broken.safetensors is not a safetensors file" in broken.inner_text()
    assert broken.get_by_role("checkbox").is_disabled()  # shown with its reason, not selectable
    assert "kohya · rank 4" in picker.locator('li[data-name="style"]').inner_text()
    scale = page.get_by_label("Scale of style")
    assert (scale.get_attribute("min"), scale.get_attribute("max"), scale.input_value()) == (
        f"{scale_schema['minimum']:g}", f"{scale_schema['maximum']:g}", f"{scale_schema['default']:g}")
    page.get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    page.get_by_label("Inference steps").fill("3")
    page.get_by_label("other", exact=True).check()
    page.get_by_label("style", exact=True).check()
    scale.fill("0.7")
    body = sent_request(page, lambda: page.get_by_role("button", name="Generate").click())
    assert body["loras"] == [{"name": "other", "scale": 1}, {"name": "style", "scale": 0.7}]  # in the order picked
    page.wait_for_selector('#status[data-state="succeeded"]', timeout=30_000)
    job, png = result_png(server, page)
    assert job["settings"]["loras"] == [{"name": "other", "scale": 1.0}, {"name": "style", "scale": 0.7}]
    recorded = read_settings(Image.open(io.BytesIO(png)))["loras"]
    assert [(lora["name"], lora["scale"], len(lora["sha256"])) for lora in recorded] == [("other", 1.0, 64),
                                                                                         ("style", 0.7, 64)]
    page.get_by_role("button", name="Reset settings").click()
    assert not page.get_by_label("style", exact=True).is_checked() and scale.input_value() == "0.7"
    item = gallery_item(page, job["id"])
    assert "other ×1, style ×0.7" in item.locator(".settings").inner_text()
    item.get_by_role("button", name="Use the prompt and settings of: a red circle on a blue background").click()
    assert page.get_by_label("other", exact=True).is_checked() and page.get_by_label("style", exact=True).is_checked()
    assert page.get_by_label("Scale of style").input_value() == "0.7"
    assert page.get_by_label("Scale of other").input_value() == "1"
    body = sent_request(page, lambda: page.get_by_role("button", name="Generate").click())
    assert body["loras"] == [{"name": "other", "scale": 1}, {"name": "style", "scale": 0.7}]  # the job's order
    page.wait_for_selector('#status[data-state="succeeded"]', timeout=30_000)


def test_a_lora_gone_from_the_folder_is_shown_and_the_servers_refusal_is_beside_the_picker(page, server, lora_dir):
    late = write_demo_lora(lora_dir / "late.safetensors", 5)
    page.get_by_role("button", name="Reload list").click()
    page.locator('[data-field="loras"] li[data-name="late"]').wait_for()
    page.get_by_label("late", exact=True).check()
    late.unlink()
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_role("button", name="Generate").click()
    error = page.locator('[data-field="loras"] .field-error')
    error.wait_for()
    assert "loras.0.name='late' is not in this server's LoRA folder" in error.inner_text()
    assert "other" in error.inner_text() and str(lora_dir) not in error.inner_text()
    assert page.locator("#field-loras").get_attribute("aria-invalid") == "true"
    page.get_by_role("button", name="Reload list").click()
    page.wait_for_selector('li[data-name="late"] .lora-problem')
    assert "Not in this server's LoRA folder now" in page.locator('li[data-name="late"]').inner_text()
    assert page.get_by_label("late", exact=True).is_checked()  # still picked: shown, not dropped unseen
    page.get_by_label("late", exact=True).uncheck()
    assert error.is_hidden()  # changing the picker clears its message


def test_queue_full_and_network_errors_in_the_general_area(page, server):
    body = {"error": {"message": "the queue is full (8 jobs waiting); retry later", "type": "rate_limit_error",
                      "param": None, "code": "queue_full"}}
    page.route("**/v1/generations", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "7", "Content-Type": "application/json"}, body=json.dumps(body)))
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_role("button", name="Generate").click()
    general = page.locator("#general-error")
    general.wait_for()
    assert "queue is full" in general.inner_text() and "7 s" in general.inner_text()
    page.unroute("**/v1/generations")
    page.route("**/v1/generations", lambda route: route.abort("connectionrefused"))
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => /Cannot reach the server/.test(document.getElementById('general-error').textContent)",
                           timeout=WAIT_MS)
    assert page.get_by_role("alert").filter(has_text="Cannot reach").count() == 1


def test_phone_shows_prompt_and_generate_first_and_unfolds_settings_in_error(browser, server):
    page = open_page(browser, server.url, **PHONE)
    try:
        settings, width = page.locator("#settings"), page.get_by_label("Width")
        assert page.evaluate("() => scrollY") == 0
        for control in (page.get_by_label("Prompt", exact=True), page.get_by_role("button", name="Generate")):
            box = control.bounding_box()
            assert control.is_visible() and box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], box
        assert not settings.evaluate("d => d.open") and width.is_hidden()  # folded on a phone
        settings.locator("summary").click()  # the user opens them, sets a wrong width, folds them again
        width.fill("1001")
        settings.locator("summary").click()
        assert width.is_hidden()
        page.get_by_label("Prompt", exact=True).fill("a red circle")
        page.get_by_role("button", name="Generate").click()
        width_error = page.locator('[data-field="width"] .field-error')
        width_error.wait_for(state="visible")  # the server's 422 unfolded the section
        assert settings.evaluate("d => d.open") and "multiple of 8" in width_error.inner_text()
        assert width.evaluate("e => e === document.activeElement")  # and took the user there
        assert width_error.evaluate("e => { const r = e.getBoundingClientRect(); "
                                    "return r.top >= 0 && r.bottom <= innerHeight + 1; }")  # + subpixels
        settings.locator("summary").click()  # folded again, the summary still says a setting is wrong
        assert "needs fixing" in settings.locator("summary").evaluate("s => getComputedStyle(s, '::after').content")
    finally:
        close_page(page, server.url)


def test_phone_width_has_no_horizontal_scroll(browser, server, styled_job):
    page = open_page(browser, server.url, **PHONE)
    try:
        item = gallery_item(page, styled_job["id"])
        item.scroll_into_view_if_needed()  # gallery pictures load lazily, when near the screen
        assert natural_width(page, f'#gallery li[data-id="{styled_job["id"]}"] img') == 64
        item.locator("button.use").click()
        assert natural_width(page, "#result img") == 64
        page.locator("#settings summary").click()
        page.get_by_label("Width").fill("1001")
        page.get_by_role("button", name="Generate").click()
        page.locator('[data-field="width"] .field-error').wait_for()
        overflow = page.evaluate("""() => ({page: document.documentElement.scrollWidth - innerWidth,
            wide: [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > innerWidth + 1)
                  .map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 5)})""")
        assert overflow == {"page": 0, "wide": []}
    finally:
        close_page(page, server.url)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A real server started with --api-key: every API call, the event stream and the images need the key."""
    server = start_server(tmp_path_factory.mktemp("page-key") / "data", faults=True, api_key=API_KEY)
    yield server
    server.stop(signal.SIGTERM, timeout=20)


def test_api_key_is_asked_for_kept_and_sent(browser, keyed_server):
    server = keyed_server
    page = new_page(browser)
    try:
        page.goto(server.url + "/")
        key = page.get_by_label("API key")
        key.wait_for()
        assert key.get_attribute("type") == "password"
        assert "API key" in page.locator("#general-error").inner_text()
        key.fill("wrong")
        page.get_by_role("button", name="Use key").click()
        page.wait_for_function("() => /refused/.test(document.getElementById('key-error').textContent)",
                               timeout=WAIT_MS)
        key.fill(API_KEY)
        page.get_by_role("button", name="Use key").click()
        page.wait_for_selector("#field-width")
        assert key.is_hidden() and page.locator("#general-error").is_hidden()
        assert page.evaluate("() => localStorage.getItem('pixart-sigma-api-key')") == API_KEY
        page.get_by_label("Prompt", exact=True).fill("[slow] a red circle on a blue background")
        page.get_by_label("Inference steps").fill("4")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.getElementById('progress').value >= 1", timeout=WAIT_MS)
        page.wait_for_selector('#status[data-state="succeeded"]', timeout=20_000)
        assert natural_width(page, "#result img") == 64  # fetched with the key, shown from a blob
        assert page.locator("#result img").get_attribute("src").startswith("blob:")
        page.wait_for_selector('#gallery li:first-child[data-status="succeeded"]')
        assert natural_width(page, "#gallery li:first-child img") == 64
        page.reload()  # the key is remembered
        page.wait_for_selector('#gallery li[data-status="succeeded"]')
        assert key.is_hidden()
    finally:
        close_page(page, server.url)


def policy_of(answer) -> dict[str, list[str]]:
    """A Content-Security-Policy header as directive -> sources."""
    directives = (part.split() for part in answer.headers.get("content-security-policy", "").split(";"))
    return {name: sources for name, *sources in filter(None, directives)}


def test_page_works_under_its_content_security_policy(browser, server):
    """The server forbids inline scripts and styles, eval and other origins: a generation, a refused setting and
    a gallery pick run without one violation (close_page checks every page test the same way)."""
    with server.client() as client:
        for path in ("/", "/static/app.js", "/static/style.css"):
            answer = client.get(path)
            assert policy_of(answer) == POLICY, path  # without it the checks below would prove nothing
            assert answer.headers.get("x-content-type-options") == "nosniff", path  # so the types must be right
    page = open_page(browser, server.url)
    try:
        page.get_by_label("Prompt", exact=True).fill("[slow] a blue square on a red background")
        page.get_by_label("Inference steps").fill("3")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector('#status[data-state="succeeded"]', timeout=20_000)
        assert natural_width(page, "#result img") == 64
        page.wait_for_selector('#gallery li:first-child[data-status="succeeded"]')
        assert natural_width(page, "#gallery li:first-child img") == 64
        page.locator("#gallery li:first-child button.use").click()
        page.get_by_label("Height").fill("1001")
        page.get_by_role("button", name="Generate").click()
        page.locator('[data-field="height"] .field-error').wait_for()
        assert page.evaluate("() => window.cspViolations") == []
        # the policy is enforced and heard: an inline style attribute is refused and recorded
        page.evaluate("() => document.body.setAttribute('style', 'background: red')")
        page.wait_for_function("() => window.cspViolations.length === 1", timeout=WAIT_MS)
        assert page.evaluate("() => getComputedStyle(document.body).backgroundColor") != "rgb(255, 0, 0)"
        page.evaluate("() => { window.cspViolations = []; }")
    finally:
        close_page(page, server.url)


@pytest.mark.parametrize("which", ["server", "keyed_server"])
def test_page_refuses_to_be_framed(browser, request, which):
    """A page elsewhere cannot show the app in a frame (clickjacking): the frame stays without it."""
    server = request.getfixturevalue(which)
    page = new_page(browser)
    try:
        # about:blank is another origin (Chromium keeps public sites from framing loopback addresses at all)
        page.set_content(f'<!doctype html><iframe id="app" src="{server.url}/"></iframe>')  # waits for the frame
        assert server.url + "/" in page.requests  # the frame did ask
        frame = page.frame_locator("#app")
        assert frame.locator("#generate-form").count() == 0 and frame.locator("#settings").count() == 0
        assert not [url for url in page.requests if "/static/" in url or "/v1/" in url]  # its script never ran
    finally:
        close_page(page, server.url)


def fake_job(number: int) -> dict:
    return {"id": f"job{number:02d}", "status": "cancelled", "prompt": f"picture {number}", "model_name": "demo",
            "settings": {"width": 64, "height": 64, "seed": number}, "seeds": [number], "images": [],
            "progress": {"step": 0, "total": 20}, "error": "cancelled before it started"}


def shown_ids(page) -> list[str]:
    return page.locator("#gallery li.job").evaluate_all("items => items.map(item => item.dataset.id)")


def test_show_older_follows_the_cursor_and_never_repeats_a_job(page, server):
    """The history's pages, served here by the page's rules: `next` goes back as `before`, never an offset."""
    jobs = [fake_job(number) for number in range(30, 0, -1)]  # newest first, as the server lists them
    asked = []

    def cursor(job):
        return f"{job['id']} +/=&"  # opaque to the page, which must send it back intact

    def history(route):
        query = parse_qs(urlsplit(route.request.url).query)
        asked.append(query)
        limit, before = int(query["limit"][0]), query.get("before", [None])[0]
        starts = [index + 1 for index, job in enumerate(jobs) if cursor(job) == before]
        if before is not None and not starts:
            return route.fulfill(status=422, json={"error": {"message": f"unknown cursor {before!r}"}})
        start = starts[0] if starts else 0
        listed = jobs[start:start + limit]
        route.fulfill(json={"jobs": listed, "total": len(jobs), "limit": limit,
                            "next": cursor(listed[-1]) if start + limit < len(jobs) else None})

    page.route(lambda url: urlsplit(url).path == "/v1/jobs", history)
    page.reload()
    page.wait_for_selector('#gallery li[data-id="job30"]')
    limit = int(asked[0]["limit"][0])
    assert limit < len(jobs) <= 2 * limit  # one older page holds the rest
    assert shown_ids(page) == [job["id"] for job in jobs[:limit]]
    older = page.get_by_role("button", name="Show older")
    jobs.insert(0, fake_job(31))  # another client adds a job: an offset would now repeat the last one shown
    older.click()
    page.wait_for_selector('#gallery li[data-id="job01"]')
    assert shown_ids(page) == [f"job{number:02d}" for number in range(30, 0, -1)]
    assert older.is_hidden()  # `next` was null
    page.get_by_role("button", name="Refresh").click()  # new jobs come in at the top, older pages stay
    page.wait_for_selector('#gallery li:first-child[data-id="job31"]')
    assert shown_ids(page) == [f"job{number:02d}" for number in range(31, 0, -1)]
    assert older.is_hidden()
    assert [query.get("before") for query in asked] == [None, [cursor(jobs[limit])], None]
    assert not [query for query in asked if "offset" in query]


@pytest.fixture(scope="module")
def history_server(tmp_path_factory):
    """A server of its own, whose history outgrows the page's first page."""
    server = start_server(tmp_path_factory.mktemp("page-history") / "data", faults=True, env=NO_KEY)
    yield server
    server.stop(signal.SIGTERM, timeout=20)


def add_cancelled_jobs(client, count: int) -> None:
    """`count` jobs cancelled while queued behind a slow one (plus that one), so none has to run."""
    blocker = client.post("/v1/generations", json={"prompt": "[slow] ahead", "num_inference_steps": 100}).json()
    try:
        for number in range(count):
            job = client.post("/v1/generations", json={"prompt": f"picture {number}"})
            assert job.status_code == 202, job.text
            assert client.delete(f"/v1/jobs/{job.json()['id']}").status_code == 202
    finally:
        client.delete(f"/v1/jobs/{blocker['id']}")
        wait_for_job(client, blocker["id"], timeout=30)


def test_show_older_against_the_server(browser, history_server):
    """The same with the server's own cursor: every job once, in the server's order, new ones on top."""
    server = history_server
    with server.client() as client:
        add_cancelled_jobs(client, 29)  # 30 jobs
        page = open_page(browser, server.url)
        try:
            page.wait_for_selector("#gallery li.job")
            limit = int(parse_qs(urlsplit(next(u for u in page.requests if "/v1/jobs?" in u)).query)["limit"][0])
            assert limit < 30 <= 2 * limit
            first = shown_ids(page)
            add_cancelled_jobs(client, 1)  # two more, from another client
            everything = [job["id"] for job in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
            assert len(everything) == 32 and everything[2:2 + limit] == first
            older = page.get_by_role("button", name="Show older")
            older.click()
            sync_api.expect(page.locator("#gallery li.job")).to_have_count(30)
            assert shown_ids(page) == everything[2:] and older.is_hidden()
            page.get_by_role("button", name="Refresh").click()
            sync_api.expect(page.locator("#gallery li.job")).to_have_count(32)
            assert shown_ids(page) == everything and older.is_hidden()
            assert not [u for u in page.requests if "/v1/jobs?" in u and "offset=" in u]
        finally:
            close_page(page, server.url)


# -- editing a picture -------------------------------------------------------------------------------
def picture_png(width: int, height: int) -> bytes:
    """A picture with different pixels everywhere (gradients and a red/blue split), so "kept" means kept."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([np.where(x < width // 2, 200, 30), (x * 255) // width, (y * 255) // height], axis=-1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(out, "PNG")
    return out.getvalue()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def from_data_url(url: str) -> bytes:
    assert url.startswith("data:image/") and ";base64," in url, url[:40]
    return base64.b64decode(url.split(",", 1)[1])


def choose_picture(page, tmp_path, width: int = 64, height: int = 64) -> bytes:
    """Pick a picture with the file input, as a user does; the editor opens on it."""
    source = picture_png(width, height)
    path = tmp_path / f"source-{width}x{height}.png"
    path.write_bytes(source)
    page.get_by_label("Picture to edit").set_input_files(path)
    page.locator("#editor").wait_for(state="visible")
    return source


def stroke(page, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
    """Drag the mouse across the mask canvas, from and to fractions of its shown width and height."""
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    at = lambda fx, fy: (box["x"] + fx * box["width"], box["y"] + fy * box["height"])  # noqa: E731
    page.mouse.move(*at(*start))
    page.mouse.down()
    page.mouse.move(*at(*end), steps=steps)
    page.mouse.up()


def on_line(start, end, width: int, height: int, count: int = 20) -> list[tuple[int, int]]:
    """Picture pixels (x, y) along a stroke given in fractions."""
    return [(min(width - 1, int((start[0] + t * (end[0] - start[0])) * width)),
             min(height - 1, int((start[1] + t * (end[1] - start[1])) * height)))
            for t in np.linspace(0, 1, count)]


def sent_request(page, submit) -> dict:
    """The JSON body the page posts to the job route when `submit()` runs."""
    with page.expect_request(lambda r: r.method == "POST" and urlsplit(r.url).path == "/v1/generations") as request:
        submit()
    return request.value.post_data_json


def test_edit_panel_is_folded_until_a_picture_is_chosen(page, tmp_path):
    panel = page.locator("#edit")
    assert not panel.evaluate("d => d.open") and page.locator("#editor").is_hidden()  # folded, even on a wide screen
    assert page.locator("#settings").evaluate("d => d.open")
    choose_picture(page, tmp_path, 80, 48)
    assert panel.evaluate("d => d.open")
    assert "80×48" in panel.locator("summary").inner_text()
    canvas = page.locator("#mask-canvas")
    assert canvas.evaluate("c => [c.width, c.height]") == [80, 48]  # the mask is in the picture's pixels
    shown = canvas.bounding_box()
    assert shown["width"] > 200 and abs(shown["width"] / shown["height"] - 80 / 48) < 0.02  # shown larger, same shape
    strength = page.get_by_label("Denoising strength")
    assert (strength.get_attribute("type"), strength.get_attribute("min"), strength.get_attribute("max"),
            strength.input_value()) == ("range", "0.05", "1", "0.75")  # EditSettings: above 0, at most 1, 0.75
    assert page.get_by_label("Mask blur").input_value() == "4"
    for side in ("left", "top", "right", "bottom"):
        assert page.get_by_label(f"Expand {side}").get_attribute("type") == "number"
    page.get_by_label("Expand right").fill("40")  # the outpainted margin shows beside the picture
    grown = page.locator("#stage").bounding_box()
    assert abs(grown["width"] / grown["height"] - 120 / 48) < 0.02
    assert abs(canvas.bounding_box()["width"] / grown["width"] - 80 / 120) < 0.02
    page.get_by_role("button", name="Stop editing").click()
    assert page.locator("#editor").is_hidden() and not panel.evaluate("d => d.open")


def test_painted_mask_is_sent_at_the_pictures_size(page, tmp_path):
    """What the page sends for a brush stroke, undo, the eraser and Clear mask: a grayscale PNG at the picture's own
    size, white where painted, whatever size the canvas is shown at. The route is answered here (no job is made)."""
    refusal = {"error": {"message": "strength=0.3 is refused here", "type": "invalid_request_error",
                         "fields": {"strength": ["strength=0.3 is refused here"]}}}
    page.route("**/v1/generations", lambda route: route.fulfill(status=422, json=refusal))
    generate = lambda: page.get_by_role("button", name="Generate").click()  # noqa: E731
    page.get_by_label("Prompt", exact=True).fill("a yellow circle")
    source = choose_picture(page, tmp_path, 80, 48)
    page.get_by_label("Brush size").fill("6")
    start, end = (0.1, 0.5), (0.9, 0.5)
    stroke(page, start, end)
    stroke(page, (0.5, 0.1), (0.5, 0.9))  # a second stroke, then undone
    page.get_by_role("button", name="Undo").click()
    page.get_by_label("Denoising strength").fill("0.3")
    page.get_by_label("Expand top").fill("16")
    body = sent_request(page, generate)
    error = page.locator('[data-field="strength"] .field-error')
    error.wait_for()  # a refused edit setting is shown at its control
    assert "refused" in error.inner_text()
    assert from_data_url(body["image"]) == source  # the file itself, not a re-encoding
    assert {name: body[name] for name in ("prompt", "strength", "mask_blur", "expand", "inpaint_area")} == {
        "prompt": "a yellow circle", "strength": 0.3, "mask_blur": 4, "expand": [0, 16, 0, 0], "inpaint_area": "whole"}
    mask_png = from_data_url(body["mask"])
    mask = Image.open(io.BytesIO(mask_png))
    assert (mask.size, mask.mode) == ((80, 48), "L")
    marks = np.asarray(mask)
    assert set(np.unique(marks)) == {0, 255}
    assert all(marks[y, x] == 255 for x, y in on_line(start, end, 80, 48))
    assert marks[:18].max() == 0 and marks[30:].max() == 0  # brush 6 about row 24; the undone stroke is gone
    assert np.array_equal(np.asarray(read_mask(mask_png, (80, 48))), marks)  # the library reads the same mask

    page.locator("#tool-eraser").check()  # the eraser takes out the middle of the stroke
    page.get_by_label("Brush size").fill("12")
    stroke(page, (0.5, 0.2), (0.5, 0.8))
    marks = pixels(from_data_url(sent_request(page, generate)["mask"]))
    assert marks[24, 40] == 0 and marks[24, 10] == 255 and marks[24, 70] == 255

    page.get_by_role("button", name="Clear mask").click()  # nothing painted: image-to-image, no mask sent
    sync_api.expect(page.get_by_role("button", name="Clear mask")).to_be_disabled()
    assert "mask" not in sent_request(page, generate)
    page.get_by_role("button", name="Undo").click()  # Undo brings back what Clear mask took
    assert pixels(from_data_url(sent_request(page, generate)["mask"]))[24, 10] == 255
    page.get_by_role("button", name="Stop editing").click()  # a plain generation again: no picture, no edit settings
    body = sent_request(page, generate)
    assert not {"image", "mask", "strength", "mask_blur", "expand", "inpaint_area", "fill"} & set(body)


def test_phone_editor_fits_below_generate(browser, server, tmp_path):
    page = open_page(browser, server.url, **PHONE)
    try:
        choose_picture(page, tmp_path, 128, 64)
        generate = page.get_by_role("button", name="Generate").bounding_box()
        canvas = page.locator("#mask-canvas").bounding_box()
        assert generate["y"] + generate["height"] <= PHONE["height"] and canvas["y"] > generate["y"]
        assert canvas["x"] >= 0 and canvas["x"] + canvas["width"] <= PHONE["width"]
        assert page.evaluate("() => document.documentElement.scrollWidth - innerWidth") == 0
        page.locator("#mask-canvas").scroll_into_view_if_needed()
        shown_at = page.evaluate("() => scrollY")
        stroke(page, (0.1, 0.5), (0.9, 0.5))  # painting does not scroll the page
        assert page.evaluate("() => scrollY") == shown_at
        sync_api.expect(page.get_by_role("button", name="Undo")).to_be_enabled()
    finally:
        close_page(page, server.url)


def test_a_dropped_picture_is_the_one_edited(page):
    source = picture_png(96, 64)
    dropped = page.evaluate_handle("""bytes => { const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'})); return transfer; }""",
                                   list(source))
    page.dispatch_event("#result", "dragover", {"dataTransfer": dropped})  # anywhere on the page
    assert "dropping" in page.locator("#edit").get_attribute("class")
    page.dispatch_event("#result", "drop", {"dataTransfer": dropped})
    page.locator("#editor").wait_for(state="visible")
    assert page.locator("#mask-canvas").evaluate("c => [c.width, c.height]") == [96, 64]
    assert "dropped.png (96×64)" in page.locator("#edit summary").inner_text()
    body = sent_request(page, lambda: page.get_by_role("button", name="Generate").click())
    assert from_data_url(body["image"]) == source and "mask" not in body


def test_a_file_that_is_not_a_picture_is_refused_at_the_picker(page, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    page.get_by_label("Picture to edit").set_input_files(path)
    error = page.locator('[data-field="image"] .field-error')
    error.wait_for()
    assert "notes.png cannot be read as a picture" in error.inner_text()
    assert page.locator("#editor").is_hidden()


def result_png(server, page) -> tuple[dict, bytes]:
    """The job the page just made (first in the history) and its first image's file."""
    with server.client() as client:
        job = client.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]
        return job, client.get(job["images"][0]["url"]).content


def test_inpaint_a_painted_stroke_through_the_server(page, server, tmp_path):
    """A stroke painted with the mouse is what the job repaints; everything farther than mask_blur from it is the
    picture's, byte for byte."""
    page.get_by_label("Prompt", exact=True).fill("a yellow circle on a blue background")
    page.get_by_label("Inference steps").fill("6")
    page.get_by_label("Seed").fill("5")
    source = choose_picture(page, tmp_path)
    page.get_by_label("Brush size").fill("8")
    start, end = (0.2, 0.3), (0.7, 0.6)
    stroke(page, start, end)
    body = sent_request(page, lambda: page.get_by_role("button", name="Generate").click())
    page.wait_for_selector('#status[data-state="succeeded"]', timeout=30_000)
    assert natural_width(page, "#result img") == 64
    job, result = result_png(server, page)
    assert job["pictures"] == ["image", "mask"] and job["settings"]["strength"] == 0.75
    mask_png = from_data_url(body["mask"])
    marks = pixels(mask_png)
    assert all(marks[y, x] == 255 for x, y in on_line(start, end, 64, 64))  # the mask covers the stroke
    recorded = read_settings(Image.open(io.BytesIO(result)))
    assert recorded["mask_sha256"] == picture_sha256(read_mask(mask_png, (64, 64)))  # ... and is the job's mask
    assert recorded["source_sha256"] == picture_sha256(Image.open(io.BytesIO(source)).convert("RGB"))
    blur = job["settings"]["mask_blur"]
    reach = np.asarray(Image.fromarray(marks).filter(ImageFilter.MaxFilter(2 * blur + 1))) > 0
    made, before = pixels(result), pixels(source)
    assert made.shape == before.shape == (64, 64, 3)
    assert np.array_equal(made[~reach], before[~reach])  # the rest is kept exactly
    assert (made[marks > 0] != before[marks > 0]).any()  # and the stroke was repainted


def test_edit_this_on_a_gallery_item_then_outpaint(page, server, styled_job):
    page.get_by_role("button", name="Refresh").click()
    item = gallery_item(page, styled_job["id"])
    item.get_by_role("button", name="Edit this picture: a red circle on a blue background").click()
    page.locator("#editor").wait_for(state="visible")
    assert page.locator("#mask-canvas").evaluate("c => [c.width, c.height]") == [64, 64]
    assert styled_job["images"][0]["name"] in page.locator("#edit summary").inner_text()
    page.get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    page.get_by_label("Inference steps").fill("4")
    page.get_by_label("Expand right").fill("32")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector('#status[data-state="succeeded"]', timeout=30_000)
    assert natural_width(page, "#result img") == 96
    job, result = result_png(server, page)
    assert job["settings"]["expand"] == [0, 0, 32, 0] and job["pictures"] == ["image"]
    with server.client() as client:
        before = pixels(client.get(styled_job["images"][0]["url"]).content)
    made = pixels(result)
    assert made.shape == (64, 96, 3) and np.array_equal(made[:, :64], before)  # the picture kept, 32 columns grown
