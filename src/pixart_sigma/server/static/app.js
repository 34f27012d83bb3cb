// The page of `pixart-sigma serve`: a form generated from GET /v1/schema, jobs followed over
// server-sent events (read with fetch so an API key can be sent), and the job history as a gallery.
// Plain browser JavaScript, no build step, nothing fetched from anywhere but this server.
"use strict";

(() => {
  const KEY_STORAGE = "pixart-sigma-api-key";
  const PAGE_SIZE = 24;
  const FINISHED = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
  const NARROW = "(max-width: 760px)";  // as in style.css
  // EditSettings (settings.py): shown in the edit panel and sent only with a picture. The pictures themselves
  // come from the editor, never from form fields.
  const EDIT_NAMES = new Set(["strength", "mask_blur", "invert_mask", "inpaint_area", "inpaint_padding", "expand",
    "fill"]);
  const PICTURE_NAMES = new Set(["image", "mask"]);
  // The edit settings' schema as settings.py declares it, for a server whose /v1/schema does not list them.
  const EDIT_FALLBACK = {
    strength: { type: "number", title: "Denoising strength", default: 0.75, exclusiveMinimum: 0, maximum: 1,
      description: "How much of the picture is redrawn, above 0 up to 1: 1 keeps only its broad layout, 0.2 its "
        + "colours and shapes." },
    mask_blur: { type: "integer", title: "Mask blur", default: 4, minimum: 0, maximum: 64,
      description: "Soften the mask's edge by this many pixels: pixels farther than this from the mask are the "
        + "picture's, byte for byte." },
    invert_mask: { type: "boolean", title: "Invert mask", default: false,
      description: "Repaint what the mask leaves unmarked instead of what it marks." },
    inpaint_area: { type: "string", title: "Inpaint area", default: "whole", enum: ["whole", "masked"],
      description: "whole: the whole picture is denoised (the mask says what may change); masked: only the mask's "
        + "bounding box plus inpaint_padding, scaled to the checkpoint's native size and pasted back: more detail "
        + "for a small mask." },
    inpaint_padding: { type: "integer", title: "Inpaint padding", default: 32, minimum: 0, maximum: 256,
      description: "Pixels of context around the mask's bounding box when inpaint_area is masked." },
    fill: { type: "string", title: "Outpaint fill", default: "edge", enum: ["edge", "noise"],
      description: "edge: the new area starts as the picture's edge colours, stretched outward; noise: the new area "
        + "starts as random colours (from each image's seed)." },
    expand: { type: "array", title: "Outpaint (expand)", default: [0, 0, 0, 0],
      description: "Grow the canvas by left, top, right, bottom pixels and paint the new area (outpainting); the "
        + "picture itself is kept exactly." },
  };
  const MAX_EXPAND = 2048;  // settings.py's MAX_SIDE, expand's bound per side (its schema does not carry it)
  const STRENGTH_STEP = 0.05;
  const SIDES = ["left", "top", "right", "bottom"];
  const STAGE_HEIGHT = 420;  // the tallest the picture is shown while painting, in CSS pixels

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
  const editPanel = $("edit");
  const editor = $("editor");
  const fileInput = $("edit-file");
  const stage = $("stage");
  const frame = $("frame");
  const sourceImage = $("edit-source");
  const maskCanvas = $("mask-canvas");
  const brushSize = $("brush-size");
  const undoButton = $("undo");
  const clearMaskButton = $("clear-mask");

  // before: the history cursor for "Show older" (the server's `next`); null when nothing older is left.
  // edit: the picture being edited and the mask's strokes (null when not editing); drawing: the stroke under way.
  const state = { specs: [], inputs: {}, job: null, stream: null, before: null, blobs: new Map(), edit: null,
    drawing: null };

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
    else if (name === "loras") kind = "loras";  // a picker of the server's LoRAs (GET /v1/loras)
    else if (type === "array" || type === "object") kind = "json";  // another list setting: JSON text
    return {
      name, kind, choices,
      nullable: types.includes("null"),
      title: prop.title || name,
      description: prop.description || "",
      default: prop.default,
      minimum: merged.minimum,
      exclusiveMinimum: merged.exclusiveMinimum,
      maximum: merged.maximum,
      multipleOf: merged.multipleOf,
      items: merged.items,
      maxItems: merged.maxItems,
      promptLike: kind === "string" && /prompt$/.test(name),
      edit: EDIT_NAMES.has(name),
      sides: name === "expand",  // four numbers, not a text field
    };
  }

  function buildField(spec) {
    const id = `field-${spec.name}`;
    const helpId = `help-${spec.name}`;
    const errorId = `error-${spec.name}`;
    const label = el("label", { for: id, text: spec.title });
    let input;
    if (spec.sides) return buildSides(spec);
    if (spec.kind === "loras") return buildLoras(spec);
    if (spec.name === "strength") {
      // a slider: above 0 (exclusiveMinimum) up to its maximum
      const low = spec.minimum ?? (spec.exclusiveMinimum ?? 0) + STRENGTH_STEP;
      input = el("input", { id, name: spec.name, type: "range", min: low, max: spec.maximum ?? 1, step: STRENGTH_STEP });
      const shown = el("output", { id: "strength-value", for: id });
      input.addEventListener("input", () => { shown.textContent = Number(input.value).toFixed(2); });
      label.append(" ", shown);
    } else if (spec.kind === "enum") {
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

  // The four sides of `expand`, one number each; state.inputs.expand is the first, for its error and focus.
  function buildSides(spec) {
    const inputs = SIDES.map((side) => el("input", {
      id: `field-expand-${side}`, type: "number", min: 0, max: MAX_EXPAND, step: 8, inputmode: "numeric",
      placeholder: "0", "aria-describedby": "help-expand error-expand",
    }));
    inputs.forEach((input) => input.addEventListener("input", () => {
      clearFieldError("expand");
      layoutStage();
    }));
    state.sides = inputs;
    state.inputs[spec.name] = inputs[0];
    return el("fieldset", { class: "expand field-wide", "data-field": spec.name },
      el("legend", { text: spec.title }),
      el("div", { class: "expand-sides" }, ...SIDES.map((side, index) => el("div", { class: "field" },
        el("label", { for: inputs[index].id, text: `Expand ${side}` }), inputs[index]))),
      el("p", { class: "help", id: "help-expand", text: spec.description }),
      el("p", { class: "field-error", id: "error-expand" }));
  }

  // -- the LoRA picker -------------------------------------------------------------------------
  // The server's LoRA folder (GET /v1/loras): a checkbox and a scale for each; one that cannot be used is shown
  // with the server's reason and cannot be picked. The scale's bounds and default, and how many LoRAs one image
  // may use, come from the schema's `loras` setting. Picked LoRAs are sent in the order they were picked.
  function buildLoras(spec) {
    const scale = (spec.items && spec.items.properties && spec.items.properties.scale) || {};
    const list = el("ul", { class: "lora-list", id: "lora-list" });
    const reload = el("button", { type: "button", class: "quiet small", id: "reload-loras", text: "Reload list" });
    reload.addEventListener("click", () => loadLoras());
    const limit = el("p", { class: "lora-limit muted", id: "lora-limit", hidden: true });
    const wrap = el("fieldset", { class: "field field-wide loras", "data-field": spec.name, id: `field-${spec.name}`,
      name: spec.name, "aria-label": spec.title, tabindex: "-1",
      "aria-describedby": `help-${spec.name} error-${spec.name}` },
    el("legend", { text: spec.title }), list, limit,
    el("div", { class: "lora-foot" }, el("p", { class: "help", id: `help-${spec.name}`, text: spec.description }), reload),
    el("p", { class: "field-error", id: `error-${spec.name}` }));
    state.loras = { list, limit, listing: null, failed: null, picked: [], scales: new Map(), rows: 0,
      min: scale.minimum, max: scale.maximum, fallback: scale.default ?? 1, most: spec.maxItems };
    state.inputs[spec.name] = wrap;
    renderLoras();
    return wrap;
  }

  async function loadLoras() {
    const picker = state.loras;
    if (!picker) return;
    try {
      picker.listing = (await api("/v1/loras")).loras;
      picker.failed = null;
    } catch (err) {
      picker.failed = err.message || String(err);
    }
    renderLoras();
  }

  function setLoras(value) {
    const picker = state.loras;
    if (!picker) return;
    picker.picked = [];
    for (const item of Array.isArray(value) ? value : []) {
      if (!item || typeof item.name !== "string" || picker.picked.includes(item.name)) continue;
      picker.picked.push(item.name);
      picker.scales.set(item.name, String(item.scale ?? picker.fallback));
    }
    renderLoras();
  }

  function renderLoras() {
    const picker = state.loras;
    if (!picker) return;
    const rows = [];
    const listing = picker.listing || [];
    if (picker.failed) rows.push(el("li", { class: "muted", text: `The LoRA list could not be loaded: ${picker.failed}` }));
    else if (!picker.listing) rows.push(el("li", { class: "muted", text: "Loading LoRAs…" }));
    else if (!listing.length) {
      rows.push(el("li", { class: "muted", text: "This server has no LoRAs: its operator puts them in its LoRA folder "
        + "(pixart-sigma serve --lora-dir)." }));
    }
    const known = new Set(listing.map((lora) => lora.name));
    rows.push(...listing.map((lora) => loraRow(lora)));
    // a job's LoRA that the folder no longer holds (or before the list is in): shown, so it is not dropped unseen
    rows.push(...picker.picked.filter((name) => !known.has(name))
      .map((name) => loraRow({ name, missing: Boolean(picker.listing) })));
    picker.list.replaceChildren(...rows);
    updateLoraLimit();
  }

  function megabytes(bytes) {
    return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1e3))} kB`;
  }

  function loraRow(lora) {
    const picker = state.loras;
    const id = `lora-${picker.rows++}`;
    const picked = picker.picked.includes(lora.name);
    const unusable = Boolean(lora.problem);
    const box = el("input", { type: "checkbox", id, "data-lora": lora.name, disabled: unusable, checked: picked });
    box.checked = picked;
    const scale = el("input", { type: "number", id: `${id}-scale`, class: "lora-scale", "data-lora": lora.name,
      min: picker.min, max: picker.max, step: "0.05", inputmode: "decimal", disabled: unusable,
      value: picker.scales.get(lora.name) ?? String(picker.fallback), "aria-label": `Scale of ${lora.name}` });
    box.addEventListener("change", () => {
      picker.picked = picker.picked.filter((name) => name !== lora.name);
      if (box.checked) picker.picked.push(lora.name);
      clearFieldError("loras");
      updateLoraLimit();
    });
    scale.addEventListener("input", () => {
      picker.scales.set(lora.name, scale.value);
      clearFieldError("loras");
    });
    let about;
    if (unusable) about = el("p", { class: "lora-problem", text: `Cannot be used: ${lora.problem}` });
    else if (lora.missing) {
      about = el("p", { class: "lora-problem", text: "Not in this server's LoRA folder now: the server will refuse "
        + "it; uncheck it to generate without it." });
    } else if (lora.layout) {
      const ranks = (lora.ranks || []).join("/");
      about = el("span", { class: "lora-meta muted", text: `${lora.layout} · rank ${ranks} · ${lora.targets} layers · `
        + `${megabytes(lora.bytes)} · ${lora.short_hash}`, title: lora.path });
    }
    const name = el("label", { class: "check", for: id }, box, el("span", { class: "lora-name", text: lora.name }));
    return el("li", { class: `lora${unusable ? " unusable" : ""}`, "data-name": lora.name }, name,
      unusable ? null : el("label", { class: "lora-scale-label", for: scale.id, text: "Scale" }),
      unusable ? null : scale, about);
  }

  // At most `most` LoRAs per image (the schema's maxItems): the rest cannot be picked meanwhile.
  function updateLoraLimit() {
    const picker = state.loras;
    const full = Boolean(picker.most) && picker.picked.length >= picker.most;
    for (const box of picker.list.querySelectorAll("input[type=checkbox]")) {
      const row = box.closest("li");
      if (!box.checked) box.disabled = full || row.classList.contains("unusable");
    }
    picker.limit.hidden = !full;
    picker.limit.textContent = full ? `At most ${picker.most} LoRAs per image: uncheck one to pick another.` : "";
  }

  // The picked LoRAs as the request sends them, in the order picked; an empty scale is the default one.
  function pickedLoras() {
    const picker = state.loras;
    if (!picker) return { loras: [] };
    const loras = [];
    for (const name of picker.picked) {
      const input = [...picker.list.querySelectorAll("input.lora-scale")].find((item) => item.dataset.lora === name);
      if (input && input.validity.badInput) return { loras, problem: `Enter a number for the scale of ${name}.` };
      const text = input ? input.value.trim() : picker.scales.get(name) || "";
      loras.push({ name, scale: text === "" ? picker.fallback : Number(text) });
    }
    return { loras };
  }

  function buildForm(schema) {
    const properties = { ...schema.properties };
    for (const [name, prop] of Object.entries(EDIT_FALLBACK)) properties[name] = properties[name] || prop;
    state.specs = Object.entries(properties).filter(([name]) => !PICTURE_NAMES.has(name))
      .map(([name, prop]) => describe(name, prop));
    state.inputs = { image: fileInput };
    const promptFields = $("prompt-fields");
    const settingsFields = $("settings-fields");
    promptFields.replaceChildren();
    settingsFields.replaceChildren();
    const editFields = $("edit-fields");
    editFields.replaceChildren();
    // the negative prompt leads the settings: as a full-width row below the others it would leave a gap
    const wideFirst = [...state.specs].sort((a, b) => Number(b.promptLike) - Number(a.promptLike));
    for (const spec of wideFirst) {
      const place = spec.name === "prompt" ? promptFields : spec.edit ? editFields : settingsFields;
      place.append(buildField(spec));
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
    if (spec.sides) {
      state.sides.forEach((side, index) => { side.value = value && value[index] ? String(value[index]) : ""; });
      layoutStage();
    } else if (spec.kind === "loras") setLoras(value);
    else if (spec.kind === "boolean") input.checked = Boolean(value);
    else if (spec.kind === "enum") {
      const index = spec.choices.indexOf(value);
      input.value = index >= 0 ? String(index) : spec.nullable ? "" : "0";
    } else if (spec.kind === "json") {
      input.value = value === null || value === undefined || (Array.isArray(value) && !value.length)
        ? "" : JSON.stringify(value);
    } else input.value = value === null || value === undefined ? "" : String(value);
    if (spec.name === "strength") input.dispatchEvent(new Event("input"));  // its shown value
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
      if (spec.edit && !state.edit) continue;  // edit settings apply only with a picture
      if (spec.sides) {
        if (state.sides.some((side) => side.validity.badInput)) problems[spec.name] = ["Enter a number for each side."];
        else body[spec.name] = expandValues();
      } else if (spec.kind === "loras") {
        const { loras, problem } = pickedLoras();
        if (problem) problems[spec.name] = [problem];
        else if (loras.length) body[spec.name] = loras;
      } else if (spec.kind === "boolean") body[spec.name] = input.checked;
      else if (spec.kind === "enum") {
        if (input.value !== "") body[spec.name] = spec.choices[Number(input.value)];
      } else if (spec.kind === "integer" || spec.kind === "number") {
        if (input.validity.badInput) problems[spec.name] = ["Enter a number."];
        else if (input.value.trim() !== "") body[spec.name] = Number(input.value);
      } else if (spec.kind === "json") {
        if (input.value.trim() === "") continue;
        try {
          body[spec.name] = JSON.parse(input.value);
        } catch (error) {
          problems[spec.name] = [`Enter JSON, e.g. [{"name": "my-style", "scale": 0.8}] (${error.message}).`];
        }
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
      for (const panel of [settingsPanel, editPanel]) {
        if (panel.contains(input)) panel.open = true;  // a folded message would go unseen
      }
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
    return el("figure", {}, img, el("figcaption", {}, el("span", { text: `Seed ${image.seed}` }), link,
      editButton(image.url, image.name, job.prompt)));
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
    if (Array.isArray(value) && value.some((item) => item && typeof item === "object")) {
      return value.length ? value.map((item) => (item && item.name !== undefined
        ? `${item.name} ×${item.scale ?? 1}` : JSON.stringify(item))).join(", ") : "none";
    }
    if (Array.isArray(value) && !value.length) return "none";
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
          ...links, first ? editButton(first.url, first.name, job.prompt) : null),
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

  // -- editing a picture -----------------------------------------------------------------------
  // The mask is a list of strokes in the picture's own pixels, so undo is dropping the last one and the mask
  // sent is drawn again at the picture's size, whatever size the canvas is shown at.
  // A stroke: { tool: "brush" | "eraser", size, points: [[x, y], ...] }, or { tool: "clear" }.
  const OVERLAY = {  // what the user sees: red paint over the picture (the canvas is made translucent in CSS)
    paint: "#ff3b30", eraseWith: "destination-out",
    blank: (ctx) => ctx.clearRect(0, 0, ctx.canvas.width, ctx.canvas.height),
  };
  const MASK = {  // what is sent: white = repaint, black = keep
    paint: "#ffffff", eraseWith: "source-over",
    blank: (ctx) => {
      ctx.globalCompositeOperation = "source-over";
      ctx.fillStyle = "#000000";
      ctx.fillRect(0, 0, ctx.canvas.width, ctx.canvas.height);
    },
  };

  function drawSegment(ctx, look, stroke, from, to) {
    ctx.globalCompositeOperation = stroke.tool === "eraser" ? look.eraseWith : "source-over";
    ctx.fillStyle = ctx.strokeStyle = stroke.tool === "eraser" ? "#000000" : look.paint;
    ctx.lineWidth = stroke.size;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (from === to) {  // a click: a dot (a zero-length line draws nothing)
      ctx.arc(to[0], to[1], stroke.size / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(from[0], from[1]);
      ctx.lineTo(to[0], to[1]);
      ctx.stroke();
    }
  }

  function drawStrokes(ctx, look, strokes) {
    look.blank(ctx);
    for (const stroke of strokes) {
      if (stroke.tool === "clear") {
        look.blank(ctx);
        continue;
      }
      stroke.points.forEach((point, index) => drawSegment(ctx, look, stroke, stroke.points[Math.max(0, index - 1)], point));
    }
    ctx.globalCompositeOperation = "source-over";
  }

  function redrawOverlay() {
    drawStrokes(maskCanvas.getContext("2d"), OVERLAY, state.edit ? state.edit.strokes : []);
    const strokes = state.edit ? state.edit.strokes : [];
    undoButton.disabled = !strokes.length;
    clearMaskButton.disabled = !strokes.length || strokes[strokes.length - 1].tool === "clear";
  }

  function expandValues() {
    return (state.sides || []).map((side) => {
      const value = Number.parseInt(side.value, 10);
      return Number.isFinite(value) && value > 0 ? value : 0;
    });
  }

  // The picture inside the canvas it grows to: the outpainted margin shows around it.
  function layoutStage() {
    if (!state.edit) return;
    const { width, height } = state.edit;
    const [left, top, right, bottom] = expandValues();
    const fullWidth = width + left + right;
    const fullHeight = height + top + bottom;
    const percent = (part, whole) => `${(100 * part) / whole}%`;
    stage.style.aspectRatio = `${fullWidth} / ${fullHeight}`;
    stage.style.maxWidth = `${Math.round((STAGE_HEIGHT * fullWidth) / fullHeight)}px`;
    frame.style.left = percent(left, fullWidth);
    frame.style.top = percent(top, fullHeight);
    frame.style.width = percent(width, fullWidth);
    frame.style.height = percent(height, fullHeight);
  }

  // A picture from the file picker, a drop or the gallery becomes the source; its mask starts empty.
  async function useSource(blob, name) {
    clearFieldError("image");
    const url = URL.createObjectURL(blob);
    const probe = new Image();
    probe.src = url;
    try {
      await probe.decode();
    } catch {
      URL.revokeObjectURL(url);
      showFieldErrors({ image: [`${name} cannot be read as a picture: choose a PNG, JPEG or WebP file.`] });
      editPanel.open = true;
      return;
    }
    stopEditing();
    const width = probe.naturalWidth;
    const height = probe.naturalHeight;
    state.edit = { blob, name, url, width, height, strokes: [] };
    sourceImage.src = url;
    maskCanvas.width = width;
    maskCanvas.height = height;
    const longest = Math.max(width, height);
    brushSize.max = String(Math.max(8, Math.round(longest / 4)));
    brushSize.value = String(Math.max(1, Math.round(longest / 16)));
    brushSize.dispatchEvent(new Event("input"));
    redrawOverlay();
    layoutStage();
    editor.hidden = false;
    editPanel.open = true;
    $("edit-summary").textContent = `${name} (${width}×${height})`;
  }

  function stopEditing() {
    if (state.edit) URL.revokeObjectURL(state.edit.url);
    state.edit = null;
    state.drawing = null;
    sourceImage.removeAttribute("src");
    editor.hidden = true;
    $("edit-summary").textContent = "(image-to-image, inpainting, outpainting)";
  }

  async function editImage(url, name) {
    try {
      const blob = await (await api(url, { raw: true })).blob();
      await useSource(blob, name);
      editPanel.scrollIntoView({ behavior: "smooth", block: "start" });
    } catch (err) {
      showError(err);
    }
  }

  function editButton(url, name, prompt) {
    const button = el("button", { type: "button", class: "quiet edit-this", text: "Edit this",
      "aria-label": `Edit this picture: ${prompt}` });
    button.addEventListener("click", () => editImage(url, name));
    return button;
  }

  // Where a pointer is, in the picture's pixels (the canvas may be shown larger or smaller).
  function canvasPoint(event) {
    const box = maskCanvas.getBoundingClientRect();
    return [(event.clientX - box.left) * (maskCanvas.width / box.width),
      (event.clientY - box.top) * (maskCanvas.height / box.height)];
  }

  maskCanvas.addEventListener("pointerdown", (event) => {
    if (!state.edit || event.button !== 0) return;
    event.preventDefault();
    maskCanvas.setPointerCapture(event.pointerId);
    const tool = $("tool-eraser").checked ? "eraser" : "brush";
    const point = canvasPoint(event);
    state.drawing = { tool, size: Number(brushSize.value), points: [point] };
    state.edit.strokes.push(state.drawing);
    redrawOverlay();
  });

  maskCanvas.addEventListener("pointermove", (event) => {
    const stroke = state.drawing;
    if (!stroke) return;
    const ctx = maskCanvas.getContext("2d");
    const moves = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const move of moves.length ? moves : [event]) {
      const from = stroke.points[stroke.points.length - 1];
      const to = canvasPoint(move);
      stroke.points.push(to);
      drawSegment(ctx, OVERLAY, stroke, from, to);
    }
    ctx.globalCompositeOperation = "source-over";
  });

  for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
    maskCanvas.addEventListener(name, () => { state.drawing = null; });
  }

  function undo() {
    if (!state.edit || !state.edit.strokes.length) return;
    state.drawing = null;
    state.edit.strokes.pop();
    redrawOverlay();
  }

  undoButton.addEventListener("click", undo);
  clearMaskButton.addEventListener("click", () => {
    state.edit.strokes.push({ tool: "clear" });  // a step of its own, so Undo brings the strokes back
    redrawOverlay();
  });
  $("remove-picture").addEventListener("click", () => {
    stopEditing();
    fileInput.value = "";
    editPanel.open = false;
  });
  editPanel.addEventListener("keydown", (event) => {
    const typing = event.target.matches("input[type=number], input[type=text], textarea");
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z" && !typing) {
      event.preventDefault();
      undo();
    }
  });
  brushSize.addEventListener("input", () => { $("brush-size-value").textContent = brushSize.value; });
  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (file) useSource(file, file.name);
  });

  // A file dropped anywhere on the page is the picture to edit (rather than the browser leaving the page for it).
  const carriesFiles = (event) => Boolean(event.dataTransfer) && [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    editPanel.classList.add("dropping");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) editPanel.classList.remove("dropping");
  });
  document.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    editPanel.classList.remove("dropping");
    const file = event.dataTransfer.files[0];
    if (file) useSource(file, file.name);
  });

  // -- the mask as sent ------------------------------------------------------------------------
  // An 8-bit grayscale PNG at the picture's size, 255 where painted. Not canvas.toBlob: that gives RGBA in some
  // browsers, and an RGBA mask is read by OpenAI's rule (transparent = repaint), so an opaque one marks nothing.
  const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });

  function crc32(bytes) {
    let c = 0xffffffff;
    for (const byte of bytes) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  function pngChunk(type, data) {
    const chunk = new Uint8Array(12 + data.length);
    const view = new DataView(chunk.buffer);
    view.setUint32(0, data.length);
    chunk.set(new TextEncoder().encode(type), 4);
    chunk.set(data, 8);
    view.setUint32(8 + data.length, crc32(chunk.subarray(4, 8 + data.length)));
    return chunk;
  }

  async function grayPng(width, height, gray) {
    const rows = new Uint8Array((width + 1) * height);  // each row: filter type 0, then its pixels
    for (let y = 0; y < height; y++) rows.set(gray.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
    const zlib = new Blob([rows]).stream().pipeThrough(new CompressionStream("deflate"));
    const data = new Uint8Array(await new Response(zlib).arrayBuffer());
    const header = new Uint8Array(13);  // width, height, bit depth 8, colour type 0 (gray), no interlace
    new DataView(header.buffer).setUint32(0, width);
    new DataView(header.buffer).setUint32(4, height);
    header[8] = 8;
    const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
    return new Blob([signature, pngChunk("IHDR", header), pngChunk("IDAT", data), pngChunk("IEND", new Uint8Array())],
      { type: "image/png" });
  }

  // The mask, or null when nothing is painted (then the edit is image-to-image).
  async function maskPng() {
    const { width, height, strokes } = state.edit;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    drawStrokes(ctx, MASK, strokes);
    const rgba = ctx.getImageData(0, 0, width, height).data;
    const gray = new Uint8Array(width * height);
    let painted = false;
    for (let i = 0; i < gray.length; i++) {
      gray[i] = rgba[4 * i] >= 128 ? 255 : 0;  // the server's threshold: what is sent is what is repainted
      painted = painted || gray[i] === 255;
    }
    return painted ? grayPng(width, height, gray) : null;
  }

  const dataUrl = (blob) => new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });

  // The request: the settings, and for an edit the picture and mask as data: URLs in the same JSON body.
  async function submitJob(body) {
    if (state.edit) {
      const mask = await maskPng();
      body.image = await dataUrl(state.edit.blob);
      if (mask) body.mask = await dataUrl(mask);
    }
    return api("/v1/generations", { method: "POST", json: body });
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
      const job = await submitJob(body);
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
      loadLoras();
      const page = await loadGallery();
      const active = page.jobs.find((job) => !FINISHED.has(job.status));
      if (active && !state.job) follow(active);
    } catch (err) {
      showError(err);
    }
  }

  start();
})();
