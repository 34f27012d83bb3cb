// The page of `pixart-sigma serve`: a form generated from GET /v1/schema, jobs followed over
// server-sent events (read with fetch so an API key can be sent), and the job history as a gallery.
// Plain browser JavaScript, no build step, nothing fetched from anywhere but this server.
"use strict";

(() => {
  const KEY_STORAGE = "pixart-sigma-api-key";
  const PAGE_SIZE = 24;
  const FINISHED = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
  const NARROW = "(max-width: 760px)";  // as in style.css

  const $ = (id) => document.getElementById(id);
  const form = $("generate-form");
  const generateButton = $("generate");
  const cancelButton = $("cancel");
  const resetButton = $("reset");
  const progress = $("progress");
  const statusLine = $("status");
  const result = $("result");
  const gallery = $("gallery");
  const moreButton = $("more");
  const generalError = $("general-error");
  const keyForm = $("key-form");
  const settingsPanel = $("settings");

  // before: the history cursor for "Show older" (the server's `next`); null when nothing older is left.
  const state = { specs: [], inputs: {}, job: null, stream: null, before: null, blobs: new Map() };

  // -- small helpers ---------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const sentence = (text) => (text ? text.charAt(0).toUpperCase() + text.slice(1) : "");

  function apiKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  class ApiError extends Error {
    constructor(status, message, detail = {}, retryAfter = null) {
      super(message);
      this.status = status;
      this.fields = detail.fields || null;
      this.code = detail.code || null;
      this.retryAfter = retryAfter;
    }
  }

  // fetch() against this server with the API key, JSON in and out; errors become ApiError.
  async function api(path, { method = "GET", json, raw = false, signal, headers = {} } = {}) {
    const sent = new Headers(headers);
    const key = apiKey();
    if (key) sent.set("Authorization", `Bearer ${key}`);
    let body;
    if (json !== undefined) {
      sent.set("Content-Type", "application/json");
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(path, { method, headers: sent, body, signal, cache: "no-store" });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "Cannot reach the server. Check that it is running and try again.");
    }
    if (!response.ok) {
      let detail = {};
      try {
        detail = (await response.json()).error || {};
      } catch {
        /* not JSON: keep the status line */
      }
      const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
      const error = new ApiError(response.status, detail.message || `${response.status} ${response.statusText}`,
        detail, Number.isFinite(retry) ? retry : null);
      if (response.status === 401) askForKey(Boolean(key));
      throw error;
    }
    return raw ? response : response.json();
  }

  // -- the API key -----------------------------------------------------------------------------
  function askForKey(refused) {
    keyForm.hidden = false;
    $("key-error").textContent = refused ? "The server refused this key." : "";
    $("api-key").focus();
  }

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) {
      $("key-error").textContent = "Enter the key the server was started with.";
      return;
    }
    try {
      localStorage.setItem(KEY_STORAGE, key);
    } catch {
      /* private mode: the key lasts as long as the page */
    }
    $("api-key").value = "";
    keyForm.hidden = true;
    state.blobs.clear();
    start();
  });

  // Images need the key too when the server has one: an <img> cannot send it, so fetch a blob.
  function imageUrl(url) {
    if (!apiKey()) return Promise.resolve(url);
    if (!state.blobs.has(url)) {
      const pending = api(url, { raw: true }).then((r) => r.blob()).then((blob) => URL.createObjectURL(blob));
      pending.catch(() => state.blobs.delete(url));
      state.blobs.set(url, pending);
    }
    return state.blobs.get(url);
  }

  function showImage(img, link, url) {
    imageUrl(url).then((src) => {
      img.src = src;
      if (link) link.href = src;
    }).catch(() => {
      img.alt += " (could not be loaded)";
    });
  }

  // -- the form, from the schema ---------------------------------------------------------------
  function describe(name, prop) {
    const branches = prop.anyOf || prop.oneOf || [prop];
    const types = branches.flatMap((branch) => [].concat(branch.type || []));
    const main = branches.find((branch) => branch.type !== "null") || {};
    const merged = { ...main, ...prop };
    const type = types.find((t) => t !== "null");
    const choices = merged.enum;
    let kind = "string";
    if (choices) kind = "enum";
    else if (type === "boolean") kind = "boolean";
    else if (type === "integer" || type === "number") kind = type;
    return {
      name, kind, choices,
      nullable: types.includes("null"),
      title: prop.title || name,
      description: prop.description || "",
      default: prop.default,
      minimum: merged.minimum,
      maximum: merged.maximum,
      multipleOf: merged.multipleOf,
      promptLike: kind === "string" && /prompt$/.test(name),
    };
  }

  function buildField(spec) {
    const id = `field-${spec.name}`;
    const helpId = `help-${spec.name}`;
    const errorId = `error-${spec.name}`;
    const label = el("label", { for: id, text: spec.title });
    let input;
    if (spec.kind === "enum") {
      input = el("select", { id, name: spec.name });
      if (spec.nullable) input.append(el("option", { value: "", text: "(default)" }));
      spec.choices.forEach((choice, index) => {
        input.append(el("option", { value: String(index), text: String(choice) }));
      });
    } else if (spec.kind === "boolean") {
      input = el("input", { id, name: spec.name, type: "checkbox" });
    } else if (spec.kind === "integer" || spec.kind === "number") {
      input = el("input", {
        id, name: spec.name, type: "number",
        inputmode: spec.kind === "integer" && !(spec.minimum < 0) ? "numeric" : "decimal",
        min: spec.minimum, max: spec.maximum,
        step: spec.multipleOf || (spec.kind === "integer" ? 1 : "any"),
        placeholder: spec.default === null || spec.default === undefined ? "default" : String(spec.default),
      });
    } else if (spec.promptLike) {
      input = el("textarea", { id, name: spec.name, rows: spec.name === "prompt" ? 3 : 2 });
    } else {
      input = el("input", { id, name: spec.name, type: "text" });
    }
    input.setAttribute("aria-describedby", `${helpId} ${errorId}`);
    if (spec.name === "prompt") input.setAttribute("placeholder", "a red circle on a blue background");
    input.addEventListener("input", () => clearFieldError(spec.name));
    const help = el("p", { class: "help", id: helpId, text: spec.description });
    const error = el("p", { class: "field-error", id: errorId });
    const wrap = spec.kind === "boolean"
      ? el("div", { class: "field field-boolean", "data-field": spec.name },
        el("div", { class: "check" }, input, label), help, error)
      : el("div", { class: `field field-${spec.kind}${spec.promptLike ? " field-wide" : ""}`, "data-field": spec.name },
        label, input, help, error);
    state.inputs[spec.name] = input;
    return wrap;
  }

  function buildForm(schema) {
    const properties = schema.properties || {};
    state.specs = Object.entries(properties).map(([name, prop]) => describe(name, prop));
    state.inputs = {};
    const promptFields = $("prompt-fields");
    const settingsFields = $("settings-fields");
    promptFields.replaceChildren();
    settingsFields.replaceChildren();
    // the negative prompt leads the settings: as a full-width row below the others it would leave a gap
    const wideFirst = [...state.specs].sort((a, b) => Number(b.promptLike) - Number(a.promptLike));
    for (const spec of wideFirst) {
      (spec.name === "prompt" ? promptFields : settingsFields).append(buildField(spec));
    }
    resetSettings();
    generateButton.disabled = false;
    resetButton.disabled = false;
    const prompt = state.inputs.prompt;
    if (prompt) {
      prompt.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
      });
    }
  }

  function setValue(spec, value) {
    const input = state.inputs[spec.name];
    if (spec.kind === "boolean") input.checked = Boolean(value);
    else if (spec.kind === "enum") {
      const index = spec.choices.indexOf(value);
      input.value = index >= 0 ? String(index) : spec.nullable ? "" : "0";
    } else input.value = value === null || value === undefined ? "" : String(value);
  }

  function resetSettings() {
    for (const spec of state.specs) {
      if (!spec.promptLike) setValue(spec, spec.default);
    }
    clearErrors();
  }

  // The request body; fields left empty are left out, so the server uses their defaults.
  function collect() {
    const body = {};
    const problems = {};
    for (const spec of state.specs) {
      const input = state.inputs[spec.name];
      if (spec.kind === "boolean") body[spec.name] = input.checked;
      else if (spec.kind === "enum") {
        if (input.value !== "") body[spec.name] = spec.choices[Number(input.value)];
      } else if (spec.kind === "integer" || spec.kind === "number") {
        if (input.validity.badInput) problems[spec.name] = ["Enter a number."];
        else if (input.value.trim() !== "") body[spec.name] = Number(input.value);
      } else if (spec.name === "prompt" || input.value.trim() !== "") {
        body[spec.name] = input.value;
      }
    }
    return { body, problems };
  }

  function fill(job) {
    const values = { ...job.settings, prompt: job.prompt, model_name: job.model_name };
    for (const spec of state.specs) {
      if (Object.prototype.hasOwnProperty.call(values, spec.name)) setValue(spec, values[spec.name]);
    }
    clearErrors();
  }

  // -- errors ----------------------------------------------------------------------------------
  function clearFieldError(name) {
    const error = $(`error-${name}`);
    if (error) error.textContent = "";
    const input = state.inputs[name];
    if (input) input.removeAttribute("aria-invalid");
  }

  function clearErrors() {
    for (const name of Object.keys(state.inputs)) clearFieldError(name);
    generalError.hidden = true;
    generalError.textContent = "";
  }

  function showGeneral(message) {
    generalError.textContent = message;
    generalError.hidden = false;
  }

  function showFieldErrors(fields) {
    const unplaced = [];
    let first = null;
    for (const [name, messages] of Object.entries(fields)) {
      const input = state.inputs[name];
      const text = [].concat(messages).join(" ");
      if (!input) {
        unplaced.push(text);
        continue;
      }
      $(`error-${name}`).textContent = text;
      input.setAttribute("aria-invalid", "true");
      if (settingsPanel.contains(input)) settingsPanel.open = true;  // a folded message would go unseen
      first = first || input;
    }
    if (unplaced.length) showGeneral(unplaced.join(" "));
    if (first) {
      first.focus({ preventScroll: true });
      first.closest(".field").scrollIntoView({ block: "nearest" });  // the message under it too
    }
  }

  function showError(err) {
    if (!(err instanceof ApiError)) {
      showGeneral(`Something went wrong: ${err && err.message ? err.message : err}`);
      return;
    }
    if (err.status === 401) showGeneral("This server needs an API key: enter it above.");
    else if (err.fields && Object.keys(err.fields).length) showFieldErrors(err.fields);
    else if (err.status === 429 || err.retryAfter) {  // queue full (429) or shutting down (503)
      const wait = err.retryAfter ? `Try again in ${err.retryAfter} s.` : "Try again shortly.";
      showGeneral(`${sentence(err.message).replace(/[.;:,\s]+$/, "")}. ${wait}`);
    } else showGeneral(sentence(err.message));
  }

  // -- following a job -------------------------------------------------------------------------
  function setStatus(text, kind) {
    statusLine.textContent = text;
    statusLine.dataset.state = kind;
  }

  function setProgress(step, total) {
    progress.max = Math.max(1, total || 1);
    progress.value = Math.min(step || 0, progress.max);
  }

  function onEvent(job, event, data) {
    if (state.job !== job) return false;
    if (event === "queued") {
      setProgress(0, job.progress && job.progress.total);
      setStatus(`Queued: position ${data.position} in the queue.`, "queued");
    } else if (event === "running") {
      setStatus("Running…", "running");
    } else if (event === "progress") {
      setProgress(data.step, data.total);
      setStatus(`Step ${data.step} of ${data.total}`, "running");
    } else if (event === "done") {
      finish(data);
      return true;
    }
    return false;
  }

  // Read a text/event-stream body; `handle` returns true to stop. Resolves true when it stopped.
  async function readEvents(response, handle) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
        let parsed = {};
        try {
          parsed = data.length ? JSON.parse(data.join("\n")) : {};
        } catch {
          /* keep {} */
        }
        if (handle(event, parsed)) {
          reader.cancel().catch(() => {});
          return true;
        }
      }
    }
  }

  async function follow(job) {
    if (state.stream) state.stream.abort();
    const controller = new AbortController();
    state.stream = controller;
    state.job = job;
    cancelButton.disabled = false;
    result.replaceChildren();
    setProgress(job.progress ? job.progress.step : 0, job.progress ? job.progress.total : 1);
    setStatus(job.status === "queued" && job.queue_position ? `Queued: position ${job.queue_position} in the queue.`
      : "Starting…", job.status);
    for (let attempt = 0; !controller.signal.aborted; attempt++) {
      try {
        const response = await api(`/v1/jobs/${job.id}/events`, {
          raw: true, signal: controller.signal, headers: { Accept: "text/event-stream" },
        });
        if (await readEvents(response, (event, data) => onEvent(job, event, data))) return;
        const latest = await api(`/v1/jobs/${job.id}`, { signal: controller.signal });
        if (FINISHED.has(latest.status)) {
          finish(latest);
          return;
        }
      } catch (err) {
        if (controller.signal.aborted) return;
        if (err instanceof ApiError && err.status >= 400 && err.status !== 429 && err.status < 500) {
          showError(err);
          cancelButton.disabled = true;
          return;
        }
        setStatus("Lost the connection to the server; retrying…", "retrying");
      }
      await sleep(Math.min(10000, 500 * 2 ** attempt));
    }
  }

  function imageFigure(job, image, index) {
    const label = `${job.prompt} (seed ${image.seed})`;
    const img = el("img", { alt: label, width: job.settings.width, height: job.settings.height, decoding: "async" });
    const link = el("a", {
      class: "button download", href: image.url, download: image.name,
      text: job.images.length > 1 ? `Download PNG ${index + 1}` : "Download PNG",
    });
    showImage(img, link, image.url);
    return el("figure", {}, img, el("figcaption", {}, el("span", { text: `Seed ${image.seed}` }), link));
  }

  function finish(job) {
    if (state.job && state.job.id === job.id) {
      cancelButton.disabled = true;
      state.job = job;
      const total = (job.progress && job.progress.total) || 1;
      if (job.status === "succeeded") {
        setProgress(total, total);
        const seconds = job.started && job.finished ? ` in ${(job.finished - job.started).toFixed(1)} s` : "";
        setStatus(`Done${seconds}.`, "succeeded");
      } else if (job.status === "cancelled") {
        setStatus(/^cancelled/i.test(job.error || "") ? `${sentence(job.error)}.` : "Cancelled.", "cancelled");
      } else if (job.status === "interrupted") {
        setStatus(`Interrupted${job.error ? `: ${job.error}` : ""}.`, "interrupted");
      } else {
        setStatus(`Failed: ${job.error || "unknown error"}`, "failed");
      }
      result.replaceChildren(...(job.images || []).map((image, index) => imageFigure(job, image, index)));
    }
    loadGallery().catch(showError);
  }

  // -- the gallery -----------------------------------------------------------------------------
  function formatValue(value) {
    if (value === null || value === undefined || value === "") return "default";
    if (typeof value === "boolean") return value ? "on" : "off";
    return String(value);
  }

  function settingsList(job) {
    const values = { ...job.settings, model_name: job.model_name };
    const list = el("dl", { class: "settings" });
    const titles = new Map(state.specs.map((spec) => [spec.name, spec.title]));
    for (const [name, value] of Object.entries(values)) {
      if (name === "prompt" || (name === "negative_prompt" && !value)) continue;
      const title = `${titles.get(name) || name}:`;
      list.append(el("div", {}, el("dt", { text: title }), el("dd", { text: formatValue(value) })));
    }
    return list;
  }

  function galleryItem(job) {
    const first = (job.images || [])[0];
    const picture = first
      ? el("img", { alt: "", width: job.settings.width, height: job.settings.height, loading: "lazy" })
      : el("span", { class: "placeholder", text: job.status });
    if (first) showImage(picture, null, first.url);
    const use = el("button", {
      type: "button", class: "use", title: "Load this prompt and its settings into the form",
      "aria-label": `Use the prompt and settings of: ${job.prompt}`,
    }, picture);
    use.addEventListener("click", () => {
      fill(job);
      if (!state.job || FINISHED.has(state.job.status)) showJob(job);
      form.scrollIntoView({ behavior: "smooth", block: "start" });
      state.inputs.prompt && state.inputs.prompt.focus({ preventScroll: true });
    });
    const links = (job.images || []).map((image, index) => el("a", {
      class: "download", href: image.url, download: image.name,
      text: job.images.length > 1 ? `PNG ${index + 1}` : "Download PNG",
    }));
    links.forEach((link, index) => {
      if (apiKey()) showImage(new Image(), link, job.images[index].url);
    });
    return el("li", { class: "job", "data-id": job.id, "data-status": job.status },
      use,
      el("div", { class: "info" },
        el("p", { class: "prompt", text: job.prompt }),
        el("p", { class: "meta" }, el("span", { class: `badge ${job.status}`, text: job.status }),
          ...links),
        settingsList(job)));
  }

  // A gallery job shown in the result area (without following it).
  function showJob(job) {
    if (!FINISHED.has(job.status)) return;
    if (state.stream) state.stream.abort();
    state.job = job;
    finishView(job);
  }

  function finishView(job) {
    const total = (job.progress && job.progress.total) || 1;
    setProgress(job.status === "succeeded" ? total : (job.progress && job.progress.step) || 0, total);
    setStatus(`${sentence(job.status)}: ${job.prompt}`, job.status);
    cancelButton.disabled = true;
    result.replaceChildren(...(job.images || []).map((image, index) => imageFigure(job, image, index)));
  }

  // The newest page, merged into what is shown: shown jobs are redrawn in place, new ones go on top, and
  // older pages already opened stay. `older`: the page after the cursor, for "Show older". The cursor
  // moves only with "Show older" (or the first load), so jobs added meanwhile are never fetched twice.
  async function loadGallery(older = false) {
    const query = older && state.before !== null ? `&before=${encodeURIComponent(state.before)}` : "";
    const page = await api(`/v1/jobs?limit=${PAGE_SIZE}${query}`);
    const shown = new Map([...gallery.querySelectorAll("li.job")].map((item) => [item.dataset.id, item]));
    const fresh = [];
    for (const job of page.jobs) {
      if (shown.has(job.id)) shown.get(job.id).replaceWith(galleryItem(job));
      else fresh.push(galleryItem(job));
    }
    gallery.querySelectorAll("li.empty").forEach((item) => item.remove());
    if (older) gallery.append(...fresh);
    else gallery.prepend(...fresh);
    if (older || !shown.size) state.before = page.next ?? null;
    if (!gallery.children.length) gallery.append(el("li", { class: "empty muted", text: "No pictures yet." }));
    moreButton.hidden = state.before === null;
    return page;
  }

  // -- wiring ----------------------------------------------------------------------------------
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const { body, problems } = collect();
    if (Object.keys(problems).length) {
      showFieldErrors(problems);
      return;
    }
    generateButton.disabled = true;
    try {
      const job = await api("/v1/generations", { method: "POST", json: body });
      follow(job);
      loadGallery().catch(() => {});
      if (window.matchMedia(NARROW).matches) {
        document.querySelector(".result").scrollIntoView({ behavior: "smooth", block: "start" });
      }
    } catch (err) {
      showError(err);
    } finally {
      generateButton.disabled = false;
    }
  });

  cancelButton.addEventListener("click", async () => {
    const job = state.job;
    if (!job || FINISHED.has(job.status)) return;
    cancelButton.disabled = true;
    setStatus("Cancelling…", "cancelling");
    try {
      await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
    } catch (err) {
      if (err.status !== 409) {
        showError(err);
        cancelButton.disabled = false;
      }
    }
  });

  resetButton.addEventListener("click", resetSettings);
  $("refresh").addEventListener("click", () => loadGallery().catch(showError));
  moreButton.addEventListener("click", () => loadGallery(true).catch(showError));

  if (!window.matchMedia(NARROW).matches) settingsPanel.open = true;  // there is room to show them

  async function start() {
    clearErrors();
    try {
      if (!state.specs.length) buildForm(await api("/v1/schema"));
      const page = await loadGallery();
      const active = page.jobs.find((job) => !FINISHED.has(job.status));
      if (active && !state.job) follow(active);
    } catch (err) {
      showError(err);
    }
  }

  start();
})();
