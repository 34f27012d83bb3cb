"""Routes other clients already speak (OpenAI's Images API, A1111's txt2img), translated into our jobs.

Nothing here generates: each request is translated into the body POST /v1/generations takes
(`{"prompt": ..., <our setting names>}`), submitted to the same queue with `Service.submit` (same
validation, same limits, same Idempotency-Key, same seeds drawn at submission), and then waited for
asynchronously (the store is polled; the event loop is never blocked). Invalid values get the
library's own messages, with our setting names put back into the client's words (`size`, `n`,
`model`, `steps`, `cfg_scale`, `batch_size`, `sampler_name`).

Translation rules
-----------------
OpenAI `POST /v1/images/generations` (synchronous; errors in OpenAI's shape, 400 for bad input):
    prompt -> prompt; n (1-10, OpenAI's range) -> num_images_per_prompt; size "WxH" -> width, height
    ("auto" -> the model's native size); model -> model_name (a served name; OpenAI's own names such
    as dall-e-3 or gpt-image-1 mean the default model, see OPENAI_MODEL_PREFIXES); response_format
    url (default) | b64_json (default for gpt-image-* names); output_format png only; background
    auto | opaque (transparent is refused); quality, style, moderation, complexity, user,
    safety_identifier, output_compression: accepted and ignored; stream, partial_images, frame_count
    > 1, svg: refused. Any other top-level field is one of our settings (what `extra_body` sends) and
    is validated as on /v1/generations; so `extra_body={"loras": [{"name": ..., "scale": ...}]}` applies LoRAs of
    the served folder (a name or a path it lacks is a 400 naming the entry and what the folder holds).
A1111 `POST /sdapi/v1/txt2img` (errors 422, A1111's status for bad input):
    prompt, negative_prompt, seed (-1 random), width, height as they are; steps -> num_inference_steps;
    cfg_scale -> guidance_scale; batch_size -> num_images_per_prompt; sampler_name (or the older
    sampler_index; A1111 names such as "DPM++ 2M" or "Euler a", or ours) -> scheduler; n_iter -> that
    many jobs of batch_size images, queued together, seeds consecutive as A1111's are;
    override_settings.sd_model_checkpoint -> model_name; A1111's `scheduler` (its noise-schedule
    type) must be "Automatic" (or one of our sampler names); features we cannot honour (enable_hr,
    restore_faces, tiling, subseed_strength, seed_resize_from_*, styles, scripts, refiner) are refused
    when switched on; other fields are ignored. Our own setting names are accepted too.
    LoRAs: A1111's prompt tags, `<lora:NAME:SCALE>` or `<lora:NAME>` (scale 1; `<lyco:...>` too), are taken out
    of the prompt (the model is given the text without them, and the job records that text) and become entries
    of our `loras`, in the order written, after any `loras` the request sends itself (our own field). A name is
    one of the served LoRA folder's (GET /sdapi/v1/loras lists them), never a path. Refused with 422 naming the
    tag: a tag without its closing `>` or without a name, a scale that is not a number or is out of range,
    A1111's separate text-encoder and UNet multipliers (`<lora:NAME:TE:UNET>`: a LoRA changes the transformer
    only here), a name the folder lacks (saying what it holds), and a LoRA tag in negative_prompt (A1111 would
    pass it to the text encoder as words; here it is refused, not ignored). The answer's `info.prompt` and
    `parameters.prompt` are the prompt as sent, tags included, as A1111's are; `info.extra_generation_params`
    has "Lora hashes". GET /sdapi/v1/loras lists the folder in A1111's shape ({name, alias, path, metadata}, path
    inside the folder, only the LoRAs that can be used); POST /sdapi/v1/refresh-loras reads it again (null).
    An interrupted request (POST /sdapi/v1/interrupt, or the job cancelled) answers 200 with the
    partial state, as A1111 does: the images of the batches that finished (none for a single batch),
    info.interrupted true and info.error saying where it stopped; the remaining batches are cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import time
from typing import Any, Callable, Mapping, Optional, Protocol

from fastapi import Request
from PIL import Image
from fastapi.responses import JSONResponse, Response

from .. import SettingsError, __version__, read_settings
from ..images import a1111_text
from ..settings import (MAX_IMAGES, MAX_SEED, MAX_SIDE, MIN_SIDE, SAMPLERS, SHORT_HASH_DIGITS, SIDE_MULTIPLE,
                        Settings, shown)
from .protocol import (Rejected, error_response, errors, read_json, rejected, request_schema, settings_error,
                       store_unavailable)
from .service import DRAIN_RETRY_AFTER, MAX_IDEMPOTENCY_KEY, Service
from .loras import A1111_LISTING_SCHEMA, TAG, negative_tags, tag_renamer, take_tags
from .store import Job, StoreError

POLL_SECONDS = 0.05

# -- OpenAI ------------------------------------------------------------------------------------------
OPENAI_MAX_N = 10
# OpenAI's own model names. A client written for OpenAI often cannot change the name it sends (it is
# hard-coded, or a settings screen offers only OpenAI's names); refusing them would make this route
# useless to exactly the clients it exists for. So they mean the default served model, and the
# response's non-standard `model` field says which model drew the images. Any other name must be
# served here (400, param "model", listing the served ones).
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # whole string only (fullmatch): "64x64\n" is refused
# Hints OpenAI's models read and ours have no use for: any of these values is accepted and ignored.
IGNORED_CHOICES = {
    "quality": ("auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"),  # our num_inference_steps decides
    "style": ("vivid", "natural"),
    "moderation": ("auto", "low"),
    "complexity": ("low", "medium", "high"),
}
RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "svg")
BACKGROUNDS = ("auto", "opaque", "transparent")

# -- A1111 -------------------------------------------------------------------------------------------
A1111_NAMES = {"steps": "num_inference_steps", "cfg_scale": "guidance_scale", "batch_size": "num_images_per_prompt"}
A1111_SAMPLERS = {**{sampler.a1111_name.lower(): name for name, sampler in SAMPLERS.items()},
                  **{name.lower(): name for name in SAMPLERS}}
SAMPLER_CHOICES = ", ".join(f"{sampler.a1111_name!r} ({name})" for name, sampler in SAMPLERS.items())
MAX_N_ITER = 100
# A1111 features we cannot honour: refused when switched on (value not in the "off" values).
A1111_REFUSED = {
    "enable_hr": ((False, None), "there is no hires. fix pass here; ask for the final width and height instead"),
    "restore_faces": ((False, None), "there is no face restoration here"),
    "tiling": ((False, None), "tiling is not available with this model"),
    "subseed_strength": ((0, 0.0, None), "variation seeds are not available; change seed instead"),
    "seed_resize_from_w": ((0, -1, None), "seed resizing is not available"),
    "seed_resize_from_h": ((0, -1, None), "seed resizing is not available"),
    "styles": (([], None), "A1111 styles are not available; write them into the prompt"),
    "script_name": (("", None), "A1111 scripts are not available"),
    "alwayson_scripts": (({}, None), "A1111 scripts are not available"),
    "refiner_checkpoint": (("", None), "there is no refiner pass here"),
    "firstpass_image": (("", None), "there is no hires. fix pass here"),
}
# Our per-call settings (and the load settings, so the service can say they are the server's) pass through.
OURS = frozenset(Settings.field_names())


class Served(Protocol):
    """What the translations need of a server: its models (name -> an object whose `settings` hold the
    native width and height), the default name, and the library's check of a body (`Service.validate`)."""

    models: Mapping[str, Any]
    default_model: str
    loras: Any  # the served LoRA folder (ServedLoras): its `holds()` says what it holds in an error

    def validate(self, body: Any) -> tuple[str, str, dict[str, Any]]: ...


class _Problems(Exception):
    """Problems found while translating; reported with the library's problems in one error."""


def _field(problem: str) -> str:
    return next(iter(SettingsError([problem]).by_field()))


def _renamer(names: dict[str, str], size: Optional[str] = None) -> Callable[[str], str]:
    """Put our setting names back into the client's words in one of the library's messages."""
    patterns = [(re.compile(rf"\b{re.escape(ours)}\b"), theirs) for ours, theirs in names.items()]

    def rename(problem: str) -> str:
        if size is not None and _field(problem) in ("width", "height"):
            problem = f"size={size!r}: {problem}"
        for pattern, theirs in patterns:
            problem = pattern.sub(theirs, problem)
        return problem

    return rename


def _refusal(problems: list[str], status: int, service: Served, body: dict[str, Any],
             rename: Callable[[str], str], pictures: Optional[dict[str, bytes]] = None) -> JSONResponse:
    """One error with the translation's problems and the library's problems for the rest of the body (and an
    edit's pictures: the library reads them, so call it off the event loop then)."""
    problems = list(problems)
    try:
        service.validate(body, pictures) if pictures else service.validate(body)
    except SettingsError as exc:
        problems += [rename(problem) for problem in exc.problems if problem not in problems]
    return settings_error(SettingsError(problems), status)


def _renamed(exc: SettingsError, rename: Callable[[str], str]) -> SettingsError:
    return SettingsError([rename(problem) for problem in exc.problems])


async def _wait(service: Service, job_id: str, request: Request) -> tuple[Optional[Job], Optional[Response]]:
    """Wait for a job to finish without blocking the loop: (job, None), or (job, the response to give instead)."""
    while True:
        try:
            job = service.job(job_id)
        except StoreError as exc:
            return None, store_unavailable(f"{exc}; job {job_id} is kept: follow it at /v1/jobs/{job_id}")
        if job is None:
            return None, error_response(500, f"job {job_id} is no longer in the store", kind="server_error",
                                        code="job_missing")
        if job.done:
            return job, None
        if service.draining and job.status == "queued":
            return job, error_response(
                503, f"the server is shutting down; job {job_id} stays queued and runs after the next start: "
                f"follow it at /v1/jobs/{job_id}, or repeat this request with the same Idempotency-Key",
                kind="server_error", code="draining", headers={"Retry-After": str(DRAIN_RETRY_AFTER)})
        if await request.is_disconnected():
            return job, Response(status_code=499)  # nobody reads it; the job stays in the queue and the store
        await asyncio.sleep(POLL_SECONDS)


def job_error(job: Job) -> JSONResponse:
    """A job that ended without images, as an error: never worth retrying as it stands."""
    no_retry = {"x-should-retry": "false"}
    if job.storage_failed:  # the server's disk, not the request: worth a retry later
        return store_unavailable(f"job {job.id} failed: {job.error}", code="store_unwritable")
    if job.status == "failed":
        out_of_memory = (job.error or "").startswith("out of memory")
        return error_response(500, f"job {job.id} failed: {job.error}", kind="server_error",
                              code="out_of_memory" if out_of_memory else "generation_failed", headers=no_retry)
    if job.status == "cancelled":
        return error_response(409, f"job {job.id} was cancelled: {job.error}", code="job_cancelled", headers=no_retry)
    return error_response(500, f"job {job.id} was {job.status}: {job.error}", kind="server_error",
                          code=f"job_{job.status}", headers=no_retry)


def _read_images(service: Service, names: list[str]) -> list[bytes]:
    """The images' bytes; StoreError when one has gone (its job is held, so only by hand)."""
    contents = [service.store.read_image(name) for name in names]
    if any(content is None for content in contents):
        raise StoreError(f"an image of this request is missing from {service.store.image_dir}")
    return contents


def _base64(contents: list[bytes]) -> list[str]:
    return [base64.b64encode(content).decode("ascii") for content in contents]


def _records(contents: list[bytes]) -> list[dict[str, Any]]:
    return [read_settings(Image.open(io.BytesIO(content))) for content in contents]


# -- OpenAI's Images API ---------------------------------------------------------------------------

def translate_openai(raw: Any, served: Served) -> tuple[Optional[JSONResponse], dict[str, Any], Callable, dict]:
    """An OpenAI images request in our words: (the 400 to answer instead, or None; our body; renamer; how to answer).

    The body still goes through `served.validate` (or `Service.submit`); refuse what that raises with
    `openai_refusal(exc, renamer)`.
    """
    if not isinstance(raw, dict):
        return error_response(400, f"the request body must be a JSON object, not {type(raw).__name__}",
                              code="invalid_request"), {}, _renamer({}), {}
    body, problems, rename, answer = _openai_translate(raw, served)
    if problems:
        return _refusal(problems, 400, served, body, rename), body, rename, answer
    return None, body, rename, answer


def openai_refusal(exc: SettingsError, rename: Callable[[str], str]) -> JSONResponse:
    """The library's refusal of a translated body, in the client's words, as OpenAI's 400."""
    return settings_error(_renamed(exc, rename), 400)


def openai_content(created: float, items: list[dict[str, Any]], prompt: str, seeds: list[int], width: int,
                   height: int, model_name: str, **extra: Any) -> dict[str, Any]:
    """OpenAI's images response: `items` ({"b64_json"} or {"url"} each) with their prompt and seed."""
    for item, seed in zip(items, seeds):
        item.update(revised_prompt=prompt, seed=seed)
    return {"created": int(created), "data": items, "background": "opaque", "output_format": "png",
            "size": f"{width}x{height}", "model": model_name, **extra}


def _openai_translate(raw: dict[str, Any], service: Served) -> tuple[dict[str, Any], list[str], Callable, dict]:
    """(our body, problems, renamer, how to answer) for an OpenAI images request."""
    values = dict(raw)
    body: dict[str, Any] = {}
    problems: list[str] = []
    names: dict[str, str] = {}
    if "prompt" in values:
        body["prompt"] = values.pop("prompt")

    n = values.pop("n", None)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= OPENAI_MAX_N:
            problems.append(f"n={n!r} is not valid: it must be an integer from 1 to {OPENAI_MAX_N} (send "
                            f"num_images_per_prompt instead for up to {MAX_IMAGES} images in one job)")
        elif "num_images_per_prompt" in values:
            problems.append("n and num_images_per_prompt are the same setting: send only one")
        else:
            body["num_images_per_prompt"] = n
            names["num_images_per_prompt"] = "n"

    model = values.pop("model", None)
    answer: dict[str, Any] = {"response_format": "url"}
    if model is not None:
        if not isinstance(model, str):
            problems.append(f"model={model!r} is not valid: it must be a string, one of {', '.join(service.models)}")
        elif "model_name" in values:
            problems.append("model and model_name are the same setting: send only one")
        elif model in service.models:
            body["model_name"] = model
        elif model.lower().startswith(OPENAI_MODEL_PREFIXES):
            body["model_name"] = service.default_model  # see OPENAI_MODEL_PREFIXES
            if model.lower().startswith("gpt-image-"):
                answer["response_format"] = "b64_json"  # what OpenAI's gpt-image models always answer
        else:
            problems.append(f"model={model[:200]!r} is not served here: choose one of {', '.join(service.models)} "
                            f"(OpenAI's names, e.g. dall-e-3 or gpt-image-1, mean {service.default_model})")
        names["model_name"] = "model"

    size_text = None
    size = values.pop("size", None)
    if size is not None:
        model_name = body.get("model_name", values.get("model_name", service.default_model))
        served = model_name if isinstance(model_name, str) and model_name in service.models else service.default_model
        native = service.models[served].settings
        valid = (f"use 'WIDTHxHEIGHT' in pixels, each side a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to "
                 f"{MAX_SIDE} (e.g. '1024x1024', '1536x1024'), or 'auto' for the model's native "
                 f"{native['width']}x{native['height']}")
        match = SIZE.fullmatch(size) if isinstance(size, str) else None
        if "width" in values or "height" in values:
            problems.append("size and width/height are the same setting: send only one")
        elif size == "auto":
            pass
        elif match is None:
            problems.append(f"size={str(size)[:100]!r} is not valid: {valid}")
        else:
            body["width"], body["height"] = int(match[1]), int(match[2])
            size_text = size

    response_format = values.pop("response_format", None)
    if response_format is not None:
        if response_format in RESPONSE_FORMATS:
            answer["response_format"] = response_format
        else:
            problems.append(f"response_format={response_format!r} is not valid: choose one of "
                            f"{', '.join(RESPONSE_FORMATS)}")

    output_format = values.pop("output_format", None)
    if output_format is not None and output_format != "png":
        why = "images come as PNG here, with their settings inside; use 'png'"
        problems.append(f"output_format={output_format!r} is not available: {why}" if output_format in OUTPUT_FORMATS
                        else f"output_format={output_format!r} is not valid: {why}")

    background = values.pop("background", None)
    if background == "transparent":
        problems.append("background='transparent' cannot be honoured: this model draws opaque images; "
                        "use 'auto' or 'opaque'")
    elif background is not None and background not in BACKGROUNDS:
        problems.append(f"background={background!r} is not valid: choose auto or opaque")

    for name, choices in IGNORED_CHOICES.items():
        value = values.pop(name, None)
        if value is not None and value not in choices:
            problems.append(f"{name}={value!r} is not valid: choose one of {', '.join(choices)}")
    for name in ("user", "safety_identifier"):
        value = values.pop(name, None)
        if value is not None and not isinstance(value, str):
            problems.append(f"{name}={value!r} is not valid: it must be a string")
    compression = values.pop("output_compression", None)  # PNG is lossless: nothing to compress
    if compression is not None and (isinstance(compression, bool) or not isinstance(compression, int)
                                    or not 0 <= compression <= 100):
        problems.append(f"output_compression={compression!r} is not valid: it must be an integer from 0 to 100")

    if values.pop("stream", None) not in (None, False):
        problems.append("stream=true is not available on this route: queue with POST /v1/generations and follow "
                        "/v1/jobs/{id}/events for each step")
    if values.pop("partial_images", None) not in (None, 0):
        problems.append("partial_images is not available: images are sent when they are finished")
    frames = values.pop("frame_count", None)
    if frames not in (None, 1):
        problems.append(f"frame_count={frames!r} cannot be honoured: this model draws still images; leave it out")
    values.pop("frame_duration_ms", None)  # only meaningful with frames
    if values.pop("svg", None) is not None:
        problems.append("svg cannot be honoured: images come as PNG here; leave it out")

    body.update(values)  # our own settings (what the openai client's extra_body sends); unknown names are refused
    return body, problems, _renamer(names, size_text), answer


def openai_schema(served: list[str], allow_compile: bool = False) -> dict[str, Any]:
    ours = request_schema(served, allow_compile)["properties"]
    properties = {
        "prompt": ours["prompt"],
        "n": {"type": "integer", "minimum": 1, "maximum": OPENAI_MAX_N, "default": 1,
              "description": "Images to make (num_images_per_prompt)."},
        "size": {"type": "string", "default": "auto", "examples": ["1024x1024", "1536x1024", "auto"],
                 "pattern": "^(auto|[0-9]{1,5}x[0-9]{1,5})$",
                 "description": f"'WIDTHxHEIGHT', each side a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to "
                 f"{MAX_SIDE}, or 'auto' for the model's native size."},
        "model": {"type": "string", "default": served[0], "examples": served + ["dall-e-3", "gpt-image-1"],
                  "pattern": "^(" + "|".join([re.escape(name) for name in served]
                                             + [re.escape(prefix) + ".*" for prefix in OPENAI_MODEL_PREFIXES]) + ")$",
                  "description": "A served model; OpenAI's own names (dall-e-*, gpt-image-*) mean the default."},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "url"},
        "output_format": {"type": "string", "enum": ["png"], "default": "png"},
        "background": {"type": "string", "enum": ["auto", "opaque"], "default": "auto"},
        **{name: {"type": "string", "enum": list(choices), "description": "Accepted and ignored."}
           for name, choices in IGNORED_CHOICES.items()},
        "output_compression": {"type": "integer", "minimum": 0, "maximum": 100,
                               "description": "Accepted and ignored (PNG is lossless)."},
        "user": {"type": "string", "description": "Accepted and ignored."},
    }
    for name, prop in ours.items():
        if name not in properties and name not in ("num_images_per_prompt", "width", "height", "model_name"):
            properties[name] = {**prop, "description": prop.get("description", "") + " (our setting; extra_body)"}
    return {"type": "object", "title": "OpenAI image generation request", "properties": properties,
            "required": ["prompt"], "additionalProperties": False}


# -- A1111's txt2img ---------------------------------------------------------------------------------

def _checkpoint(value: Any, service: Service) -> Any:
    """A1111 checkpoint titles look like 'name [hash]': the name is what we serve."""
    if isinstance(value, str) and value not in service.models:
        stripped = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", value)
        if stripped in service.models:
            return stripped
    return value


def _a1111_translate(raw: dict[str, Any], service: Service) -> tuple[dict[str, Any], int, list[str], Callable]:
    """(our body for one batch, n_iter, problems, renamer) for an A1111 txt2img request."""
    body: dict[str, Any] = {}
    problems: list[str] = []
    names: dict[str, str] = {}
    for name in ("prompt", "negative_prompt", "seed", "width", "height"):
        if raw.get(name) is not None:
            body[name] = raw[name]
    for theirs, ours in A1111_NAMES.items():
        if raw.get(theirs) is not None:
            if raw.get(ours) is not None and raw.get(ours) != raw.get(theirs):  # the same value twice is no conflict
                problems.append(f"{theirs} and {ours} are the same setting with different values: send only one")
            body[ours] = raw[theirs]
            names[ours] = theirs

    sampler_field = "sampler_name" if raw.get("sampler_name") is not None else "sampler_index"
    sampler = raw.get(sampler_field)
    schedule = raw.get("scheduler")
    # Our own field, with our (lower-case) names; A1111's schedule types are capitalised.
    if isinstance(schedule, str) and schedule in SAMPLERS:
        if sampler is None:
            sampler, sampler_field = schedule, "scheduler"
        elif A1111_SAMPLERS.get(str(sampler).lower()) != schedule:
            problems.append(f"scheduler={schedule!r} and {sampler_field}={sampler!r} name different samplers: "
                            "send one")
    elif schedule not in (None, "") and str(schedule).lower() != "automatic":
        problems.append(f"scheduler={str(schedule)[:100]!r} is not available: each sampler here uses its own "
                        "noise schedule; send 'Automatic' or leave it out, and choose the sampler with sampler_name")
    if sampler is not None:
        chosen = A1111_SAMPLERS.get(sampler.lower()) if isinstance(sampler, str) else None
        if chosen is None:
            problems.append(f"{sampler_field}={str(sampler)[:100]!r} is not available: choose one of "
                            f"{SAMPLER_CHOICES}")
        else:
            body["scheduler"] = chosen
        names["scheduler"] = sampler_field

    overrides = raw.get("override_settings")
    if isinstance(overrides, dict) and overrides.get("sd_model_checkpoint") is not None:
        chosen_model = _checkpoint(overrides["sd_model_checkpoint"], service)
        if raw.get("model_name") is not None and raw.get("model_name") != chosen_model:
            problems.append("override_settings.sd_model_checkpoint and model_name are the same setting with "
                            "different values: send one")
        body["model_name"] = chosen_model
        names["model_name"] = "sd_model_checkpoint"

    for name, (off, why) in A1111_REFUSED.items():
        value = raw.get(name)
        if not any(value == allowed and type(value) is type(allowed) or value is allowed for allowed in off):
            problems.append(f"{name}={value!r} cannot be honoured: {why}; leave it out")

    n_iter = raw.get("n_iter")
    cap = n_iter_cap(service)
    if n_iter is None:
        n_iter = 1
    elif isinstance(n_iter, bool) or not isinstance(n_iter, int) or not 1 <= n_iter <= cap:
        problems.append(f"n_iter={n_iter!r} is not valid: it must be an integer from 1 to {cap} here (each batch is "
                        f"one job in a queue of {service.queue_size}); raise batch_size for more images per batch")
        n_iter = 1

    send_images = _send_images(raw)
    if not isinstance(send_images, bool):
        problems.append(f"send_images={shown(send_images)} is not valid: it must be true or false (JSON booleans)")
    seed, batch_size = body.get("seed"), body.get("num_images_per_prompt", 1)
    if (n_iter > 1 and type(seed) is int and type(batch_size) is int and 0 <= seed <= MAX_SEED and batch_size >= 1
            and seed + n_iter * batch_size - 1 > MAX_SEED):
        problems.append(f"seed={seed} is too large for n_iter={n_iter} batches of {batch_size}: A1111's seeds follow "
                        f"on, so the last image (batch {n_iter}) would use seed {seed + n_iter * batch_size - 1}, past "
                        f"the largest, {MAX_SEED}; use a seed up to {MAX_SEED - n_iter * batch_size + 1}")

    for name in OURS - {"scheduler"}:  # our own names, for what A1111 has no word for (and model_name, device, dtype);
        # scheduler is A1111's schedule type, read above
        if name not in body and raw.get(name) is not None:
            body[name] = raw[name]
    return (body, n_iter, problems, _with_tags(body, problems, service, _renamer(names)))


def _with_tags(body: dict[str, Any], problems: list[str], service: Served,
               rename: Callable[[str], str]) -> Callable[[str], str]:
    """The prompt's LoRA tags taken out into `loras` (after the request's own), their problems added to
    `problems`; the renamer that names a tag in the library's messages about its entry."""
    problems += negative_tags(body.get("negative_prompt"))
    if not isinstance(body.get("prompt"), str):
        return rename
    text, tags, tag_problems = take_tags(body["prompt"], service.loras.holds)
    problems += tag_problems
    if tags:
        body["prompt"] = text
    given = body.get("loras", [])
    if not tags or not isinstance(given, list):  # a `loras` that is not a list: the library names it
        return rename
    body["loras"] = [*given, *(tag.entry() for tag in tags)]
    by_tags = tag_renamer({len(given) + index: tag for index, tag in enumerate(tags)}, len(given))

    def renamed(problem: str) -> str:
        if problem.startswith("prompt is empty"):
            problem += " (its <lora:...> tags are taken out of it: the rest is what is drawn)"
        return rename(by_tags(problem))

    return renamed


def _send_images(raw: dict[str, Any]) -> Any:
    """A1111's send_images: true when left out (or null); any other non-boolean is refused in translation."""
    value = raw.get("send_images")
    return True if value is None else value


def batch_key(key: Optional[str], index: int) -> Optional[str]:
    """The Idempotency-Key of a txt2img request's batch `index`: its own for the first, derived for the rest."""
    if not key or not index:
        return key
    derived = f"{key}#{index + 1}"
    if len(derived) <= MAX_IDEMPOTENCY_KEY:
        return derived
    return f"{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}#{index + 1}"  # a long key: still unique


def n_iter_cap(service: Service) -> int:
    """Batches one txt2img call may queue: each is a job, and all must fit the queue at once."""
    return max(1, min(MAX_N_ITER, service.queue_size + 1))


def a1111_schema(served: list[str], max_n_iter: int, allow_compile: bool = False) -> dict[str, Any]:
    ours = request_schema(served, allow_compile)["properties"]
    samplers = [sampler.a1111_name for sampler in SAMPLERS.values()]
    properties = {
        "prompt": ours["prompt"],
        "negative_prompt": {"type": "string", "default": ""},
        "seed": {"type": "integer", "default": -1, "minimum": -1, "description": "-1 draws one (info.seed says which)."},
        "steps": {**ours["num_inference_steps"], "title": "Steps"},
        "cfg_scale": {**ours["guidance_scale"], "title": "CFG scale"},
        "width": ours["width"], "height": ours["height"],
        "sampler_name": {"type": "string", "enum": samplers + list(SAMPLERS),
                         "description": "A1111's sampler name or ours; leave it out for the checkpoint's own."},
        "scheduler": {"type": "string", "enum": ["Automatic"], "description": "A1111's schedule type: Automatic only."},
        "batch_size": {**ours["num_images_per_prompt"], "title": "Batch size"},
        "n_iter": {"type": "integer", "minimum": 1, "maximum": max_n_iter, "default": 1,
                   "description": "Batches, each one job of batch_size images; seeds follow on."},
        "send_images": {"type": "boolean", "default": True},
        "override_settings": {"type": "object", "properties": {"sd_model_checkpoint": {"type": "string",
                                                                                       "enum": served}}},
        **{name: {"description": f"Refused when switched on: {why}."} for name, (_, why) in A1111_REFUSED.items()},
    }
    for name in ("use_resolution_binning", "max_sequence_length", "model_name", "loras"):
        properties[name] = {**ours[name], "description": ours[name].get("description", "") + " (our setting)"}
    properties["prompt"] = {**ours["prompt"], "description": "What to draw; A1111's LoRA tags, <lora:NAME:SCALE> or "
                            "<lora:NAME>, are taken out of it and applied (after any `loras`); GET /sdapi/v1/loras "
                            "lists the names."}
    properties["negative_prompt"]["description"] = "What to steer away from (LoRA tags are refused here)."
    return {"type": "object", "title": "A1111 txt2img request", "properties": properties, "required": ["prompt"],
            "additionalProperties": True}


def reads_files(body: Any) -> bool:
    """Whether checking this request reads files (its LoRAs): then it is checked off the event loop."""
    return isinstance(body, dict) and bool(body.get("loras"))


async def _now(function: Callable, *args: Any) -> Any:
    """`function(*args)` on the event loop: asyncio.to_thread's stand-in for what reads no file."""
    return function(*args)


def a1111_not_an_object(raw: Any) -> JSONResponse:
    return error_response(422, f"the request body must be a JSON object, not {type(raw).__name__}",
                          code="invalid_request")


def _a1111_error(response: JSONResponse) -> JSONResponse:
    """Our error, plus the `detail` text A1111's clients show."""
    body = json.loads(response.body)
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "x-should-retry")}
    return JSONResponse({**body, "detail": body["error"]["message"]}, status_code=response.status_code,
                        headers=headers)


# -- the routes --------------------------------------------------------------------------------------

async def openai_answer(service: Service, request: Request, job: Job, new: bool,
                        answer: dict[str, Any]) -> Response:
    """OpenAI's answer to an images request once its job is queued: waits for it, then its images."""
    with service.hold([job.id]):  # retention keeps it until the answer is out (and a grace period after)
        job, instead = await _wait(service, job.id, request)
        if instead is not None:
            return instead
        if job.status != "succeeded":
            return job_error(job)
        if answer["response_format"] == "b64_json":
            images = _base64(await asyncio.to_thread(_read_images, service, job.images))
    if answer["response_format"] == "b64_json":
        items = [{"b64_json": image} for image in images]
    else:
        base = str(request.base_url).rstrip("/")
        items = [{"url": f"{base}/v1/images/{name}"} for name in job.images]
        service.handed_out([job.id])
    content = openai_content(job.created, items, job.prompt, job.seeds, job.settings["width"],
                             job.settings["height"], job.model_name, job_id=job.id)
    return JSONResponse(content, headers={} if new else {"Idempotent-Replayed": "true"})


async def a1111_answer(service: Service, request: Request, raw: dict[str, Any], jobs: list[Job], n_iter: int,
                       tasks: dict[str, tuple[int, int]], parameters: Optional[dict[str, Any]] = None) -> Any:
    """A1111's answer to a txt2img or img2img request once its batches are queued: waits for each, then the
    images, `parameters` (the request as run, with the route's own fields added) and `info`."""
    try:
        for index, job in enumerate(jobs):
            tasks[job.id] = (index, n_iter)
        with service.hold([job.id for job in jobs]):  # retention keeps every batch until they are read
            finished: list[Job] = []
            stopped = None
            for index, job in enumerate(jobs):
                job, instead = await _wait(service, job.id, request)
                if instead is not None:
                    return _a1111_error(instead) if isinstance(instead, JSONResponse) else instead
                finished.append(job)
                if job.status != "succeeded":
                    for later in jobs[index + 1:]:
                        service.cancel(later.id)
                    if job.status != "cancelled":
                        return _a1111_error(job_error(job))
                    stopped = f"interrupted in batch {index + 1} of {n_iter}: {job.error}"
                    break
            names = [name for job in finished for name in job.images]
            contents = await asyncio.to_thread(_read_images, service, names)
    except StoreError as exc:  # the jobs stay in the store (and run): say so in A1111's shape
        return _a1111_error(store_unavailable(f"{exc}; the jobs {', '.join(job.id for job in jobs)} are kept: "
                                              "follow them at /v1/jobs/{id}"))
    finally:
        for job in jobs:
            tasks.pop(job.id, None)
    first = jobs[0]
    images = _base64(contents) if _send_images(raw) else []
    records = await asyncio.to_thread(_records, contents)
    infotexts = [a1111_text(record) for record in records]
    lora_hashes = ", ".join(f"{lora['name']}: {lora['sha256'][:SHORT_HASH_DIGITS]}"  # as A1111's infotext writes them
                            for lora in (records[0].get("loras") or [] if records else []))
    # the prompt as sent, LoRA tags included (as A1111's info has it); the job holds the text drawn
    written = raw["prompt"] if isinstance(raw.get("prompt"), str) and TAG.search(raw["prompt"]) else first.prompt
    settings = first.settings
    seeds = [first.seeds[0] + k for k in range(len(first.seeds) * n_iter)]
    sampler = SAMPLERS[settings["scheduler"]].a1111_name
    masked = "mask" in first.pictures
    info = {
        "prompt": written, "all_prompts": [written] * len(seeds),
        "negative_prompt": settings["negative_prompt"] or "",
        "all_negative_prompts": [settings["negative_prompt"] or ""] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": settings["width"], "height": settings["height"],
        "sampler_name": sampler, "cfg_scale": settings["guidance_scale"], "steps": settings["num_inference_steps"],
        "batch_size": len(first.seeds), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.model_name, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": settings.get("strength"),
        "extra_generation_params": {**({"Mask blur": settings["mask_blur"]} if masked else {}),
                                    **({"Lora hashes": lora_hashes} if lora_hashes else {})},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(first.created)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"pixart-sigma {__version__}",
        "job_ids": [job.id for job in jobs], "interrupted": stopped is not None, "error": stopped,
    }
    parameters = {
        "prompt": written, "negative_prompt": settings["negative_prompt"] or "",
        "seed": -1 if raw.get("seed") is None else raw["seed"],
        "steps": settings["num_inference_steps"], "cfg_scale": settings["guidance_scale"],
        "width": settings["width"], "height": settings["height"], "sampler_name": sampler,
        "batch_size": len(first.seeds), "n_iter": n_iter, "send_images": _send_images(raw),
        "override_settings": {"sd_model_checkpoint": first.model_name},
        "use_resolution_binning": settings["use_resolution_binning"],
        "max_sequence_length": settings["max_sequence_length"], **_a1111_edit_parameters(settings),
        **(parameters or {}),
    }
    return {"images": images, "parameters": parameters, "info": json.dumps(info, ensure_ascii=False)}


def _a1111_edit_parameters(settings: dict[str, Any]) -> dict[str, Any]:
    """An edit job's settings in img2img's words (none for text-to-image)."""
    if "strength" not in settings:
        return {}
    return {"denoising_strength": settings["strength"], "mask_blur": settings["mask_blur"],
            "inpainting_mask_invert": int(settings["invert_mask"]),
            "inpaint_full_res": settings["inpaint_area"] == "masked",
            "inpaint_full_res_padding": settings["inpaint_padding"]}


def a1111_submit(service: Service, request: Request, body: dict[str, Any], n_iter: int, rename: Callable,
                 pictures: Optional[dict[str, bytes]] = None) -> tuple[Optional[JSONResponse], list[Job]]:
    """Queue a request's batches, all or none: (None, jobs), or (A1111's refusal, [])."""
    key = request.headers.get("idempotency-key")
    try:
        submitted = service.submit_batches(body, n_iter, [batch_key(key, i) for i in range(n_iter)], pictures)
    except Rejected as exc:
        return _a1111_error(rejected(exc)), []
    except SettingsError as exc:
        return _a1111_error(settings_error(_renamed(exc, rename), 422)), []
    return None, [job for job, _ in submitted]


def install(app, service: Service) -> None:
    """Add the compatibility routes to `app`."""
    from . import edits

    served = list(service.models)
    tasks: dict[str, tuple[int, int]] = {}  # job id -> (batch index, batches) of an A1111 request, for progress

    def body_of(schema):
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    @app.post("/v1/images/generations", openapi_extra=body_of(openai_schema(served, service.allow_compile)), tags=["OpenAI-compatible"],
              responses=errors(400, 401, 409, 413, 415, 429, 500, 503),
              summary="OpenAI's Images API: make images and answer with them (waits for the job)")
    async def openai_generate(request: Request):
        raw = await read_json(request)
        # A request with LoRAs has their files found and read (hashed once, then cached): off the event loop.
        checked = asyncio.to_thread if reads_files(raw) else _now
        refusal, body, rename, answer = await checked(translate_openai, raw, service)
        if refusal is not None:
            return refusal
        try:
            job, new = await checked(service.submit, body, request.headers.get("idempotency-key"))
        except SettingsError as exc:
            return openai_refusal(exc, rename)
        except Rejected as exc:
            return rejected(exc)
        return await openai_answer(service, request, job, new, answer)

    @app.post("/sdapi/v1/txt2img", openapi_extra=body_of(a1111_schema(served, n_iter_cap(service), service.allow_compile)), tags=["A1111-compatible"],
              responses=errors(400, 401, 413, 415, 422, 429, 500, 503),
              summary="AUTOMATIC1111's txt2img: make images and answer with them (waits for the jobs)")
    async def txt2img(request: Request):
        raw = await read_json(request)
        if not isinstance(raw, dict):
            return _a1111_error(a1111_not_an_object(raw))
        body, n_iter, problems, rename = _a1111_translate(raw, service)
        checked = asyncio.to_thread if reads_files(body) else _now  # LoRA files are read: off the event loop
        if problems:
            return _a1111_error(await checked(_refusal, problems, 422, service, body, rename))
        refusal, jobs = await checked(a1111_submit, service, request, body, n_iter, rename)
        if refusal is not None:
            return refusal
        return await a1111_answer(service, request, raw, jobs, n_iter, tasks)

    @app.get("/sdapi/v1/loras", tags=["A1111-compatible"],
             responses={200: {"description": "The LoRAs requests may name", "content": {"application/json": {
                 "schema": A1111_LISTING_SCHEMA}}}},
             summary="AUTOMATIC1111's LoRA list: the served LoRA folder's LoRAs that can be used",
             description="name (what <lora:NAME:SCALE> names), alias (the same), path inside the LoRA folder, "
                         "metadata (the file's training metadata). A LoRA that cannot be read is left out: "
                         "GET /v1/loras says why.")
    async def a1111_loras():
        listed = await asyncio.to_thread(service.loras.listing)
        return [lora.a1111() for lora in listed if lora.problem is None]

    @app.post("/sdapi/v1/refresh-loras", tags=["A1111-compatible"],
              responses={200: {"description": "Read again", "content": {"application/json": {
                  "schema": {"type": "null"}}}}},
              summary="AUTOMATIC1111's refresh: read the LoRA folder again (answers null, as A1111 does)")
    async def a1111_refresh_loras():
        await asyncio.to_thread(service.loras.listing, True)
        return None

    edits.install(app, service, tasks)

    @app.get("/sdapi/v1/progress", tags=["A1111-compatible"], summary="AUTOMATIC1111's progress of the running job")
    async def a1111_progress():
        job_id = service.running_job
        progress = service.progress(job_id) if job_id else None
        job = service.job(job_id) if job_id else None
        queued = service.queued_count()
        if job is None or progress is None:
            state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                     "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queued": queued}
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                    "textinfo": f"{queued} jobs waiting" if queued else None}
        index, count = tasks.get(job_id, (0, 1))
        step, total = progress.step, progress.total or job.settings["num_inference_steps"]
        fraction = min(1.0, (index + step / total) / count) if total else 0.0
        elapsed = time.time() - (job.started or time.time())
        eta = elapsed / fraction - elapsed if fraction > 0 else float(service.retry_after())
        state = {"skipped": False, "interrupted": progress.cancel.is_set(), "stopping_generation": False,
                 "job": job_id, "job_count": count,
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "job_no": index,
                 "sampling_step": step, "sampling_steps": total, "queued": queued}
        return {"progress": fraction, "eta_relative": max(0.0, eta), "state": state, "current_image": None,
                "textinfo": f"job {job_id}: step {step} of {total}"}

    @app.post("/sdapi/v1/interrupt", tags=["A1111-compatible"],
              summary="AUTOMATIC1111's interrupt: cancel the running job within one step")
    async def a1111_interrupt():
        return {"interrupted": service.interrupt_running()}

    @app.get("/sdapi/v1/samplers", tags=["A1111-compatible"], summary="AUTOMATIC1111's sampler list")
    async def a1111_samplers():
        return [{"name": sampler.a1111_name, "aliases": [name], "options": {}} for name, sampler in SAMPLERS.items()]

    @app.get("/sdapi/v1/sd-models", tags=["A1111-compatible"], summary="AUTOMATIC1111's checkpoint list: the served models")
    async def a1111_models():
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
                for name in served]


__all__ = ["install", "job_error", "openai_schema", "a1111_schema", "translate_openai", "openai_refusal",
           "openai_content", "Served"]
