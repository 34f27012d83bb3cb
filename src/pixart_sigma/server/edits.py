"""The edit routes other clients speak, translated into our edit jobs (as compat.py does for text-to-image).

Each request's pictures are read by the library (`Service.submit` -> `validate_call(image=, mask=)`) before
its job exists, stored with the job under names the store makes, and handed to `generate` from there.

OpenAI `POST /v1/images/edits` (multipart/form-data; answers and errors as /v1/images/generations):
    image (one file; `image[]` with one file too) and mask (a file) -> the edit's pictures, in OpenAI's mask
    convention: the mask's fully transparent pixels mark what to repaint (a mask with no alpha channel is
    refused); without a mask the image's own fully transparent pixels do (an image with none is refused,
    as OpenAI refuses it). prompt, n, size ('auto' or left out: the image's size), response_format, model,
    background, output_format, quality, user and the other fields as on /v1/images/generations;
    input_fidelity accepted and ignored. strength defaults to OPENAI_EDIT_STRENGTH (the marked area is drawn
    anew, as OpenAI's edits do); it and our other settings may be sent as form fields (the client's
    extra_body).
A1111 `POST /sdapi/v1/img2img` (JSON; answers and errors as /sdapi/v1/txt2img):
    every txt2img field, and init_images (a list of one base64 picture; more are refused), mask (base64:
    white repaints), denoising_strength -> strength, mask_blur, inpainting_mask_invert 0/1 -> invert_mask,
    inpaint_full_res -> inpaint_area "masked" (else "whole"), inpaint_full_res_padding -> inpaint_padding.
    resize_mode 1 (crop and resize) is what is done here; 0 (just resize) is taken where it would not stretch
    (no width/height, or the picture's own aspect ratio: then both are the same resize); 2 and 3 are refused.
    inpainting_fill 1 (original) is what is done here; without a mask it has no effect and any of 0-3 is
    taken; with one, 0, 2 and 3 are refused. initial_noise_multiplier other than 1 and latent_mask are
    refused; include_init_images is taken (the pictures are never sent back: parameters show them as null).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable, Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from .. import SettingsError
from ..editing import read_picture
from ..settings import EditSettings, shown
from .compat import (_a1111_error, _a1111_translate, _openai_translate, _refusal, _renamer, a1111_answer,
                     a1111_not_an_object, a1111_schema, a1111_submit, n_iter_cap, openai_answer, openai_refusal,
                     openai_schema)
from .pictures import BadForm, decode_base64, one_each, read_form, typed_fields
from .protocol import (A1111_EDIT_ROUTE, MAX_EDIT_BODY_BYTES, OPENAI_EDIT_ROUTE, IMAGE_DESCRIPTION, MASK_DESCRIPTION,
                       Rejected, error_response, errors, picture_schema, read_json, rejected, settings_error)
from .service import Service

# -- OpenAI ------------------------------------------------------------------------------------------
OPENAI_EDIT_STRENGTH = 1.0  # OpenAI's edits draw the marked area anew; send strength for less
OPENAI_FORM_NUMBERS = frozenset({"n", "output_compression", "partial_images", "stream"})  # read as JSON in a form
OPENAI_EDIT_IGNORED = {"input_fidelity": ("high", "low")}  # gpt-image-1's hint: accepted and ignored
OPENAI_MASK_RULE = ("as in OpenAI's edits, fully transparent pixels (alpha 0) mark what to edit: in the mask, or "
                    "without a mask in the image itself")

# -- A1111 -------------------------------------------------------------------------------------------
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize (latent upscale)"}
CROP_AND_RESIZE = 1
JUST_RESIZE = 0
INPAINTING_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
ORIGINAL_FILL = 1
IMG2IMG_NAMES = {"denoising_strength": "strength", "inpaint_full_res_padding": "inpaint_padding",
                 "mask_blur": "mask_blur"}
IMG2IMG_REFUSED = {
    "initial_noise_multiplier": ((1, 1.0, None), "the picture is noised by the sampler's own schedule here"),
    "latent_mask": (("", None), "there is no separate latent mask here; send mask"),
}


# -- OpenAI's edits ----------------------------------------------------------------------------------

def openai_pictures(sent: dict[str, bytes]) -> dict[str, bytes]:
    """The edit's image and mask by OpenAI's convention (see the module's docstring); SettingsError otherwise.
    Reads the pictures: call it off the event loop."""
    if "image" not in sent:
        raise SettingsError(["image is missing: send the picture to edit as the file 'image'"])
    if "mask" in sent:
        if not _has_transparent_pixel(read_picture(sent["mask"], "mask")):  # the library would read an opaque one by white
            raise SettingsError([f"mask has no fully transparent pixel: {OPENAI_MASK_RULE}; send a PNG whose area to "
                                 "edit is transparent"])
        return {"image": sent["image"], "mask": sent["mask"]}
    if not _has_transparent_pixel(read_picture(sent["image"], "image")):
        raise SettingsError([f"image has no fully transparent pixel and no mask was sent: {OPENAI_MASK_RULE}; send "
                             "a mask, or an image whose area to edit is transparent"])
    return {"image": sent["image"], "mask": sent["image"]}  # read as a mask, its transparency marks the area


def _has_transparent_pixel(picture) -> bool:
    return picture.mode == "RGBA" and picture.getextrema()[3][0] == 0


def _openai_edit_values(fields: dict[str, list[str]]) -> tuple[dict[str, Any], list[str]]:
    """The form's values for translate_openai, and the problems of the edit-only fields."""
    values = typed_fields(fields, OPENAI_FORM_NUMBERS)
    problems = []
    for name, choices in OPENAI_EDIT_IGNORED.items():
        value = values.pop(name, None)
        if value is not None and value not in choices:
            problems.append(f"{name}={shown(value)} is not valid: choose one of {', '.join(choices)}")
    values.setdefault("strength", OPENAI_EDIT_STRENGTH)
    return values, problems


async def read_openai_form(request: Request) -> tuple[Optional[JSONResponse], dict[str, list[str]],
                                                      dict[str, list[bytes]]]:
    """(the 400 to answer instead, or None; the form's text fields; its pictures) of an OpenAI edit request."""
    try:
        fields, sent = await read_form(request)
    except BadForm as exc:
        return error_response(400, str(exc), code="invalid_multipart"), {}, {}
    except SettingsError as exc:
        return settings_error(exc, 400), {}, {}
    return None, fields, sent


def openai_edit_check(service: Service, fields: dict[str, list[str]], sent: dict[str, list[bytes]]):
    """(the 400 to answer instead, or None; our body; renamer; how to answer; pictures). Reads the pictures."""
    try:
        values, problems = _openai_edit_values(fields)
        pictures = openai_pictures(one_each(sent, {}))
    except SettingsError as exc:
        return settings_error(exc, 400), {}, None, {}, {}
    body, translation_problems, rename, answer = _openai_translate(values, service)
    problems += translation_problems
    if problems:
        return _refusal(problems, 400, service, body, rename, pictures), body, rename, answer, pictures
    return None, body, rename, answer, pictures


def openai_edit_schema(served: list[str], allow_compile: bool = False) -> dict[str, Any]:
    generation = openai_schema(served, allow_compile)
    properties = {name: prop for name, prop in generation["properties"].items()}
    properties["size"] = {**properties["size"], "description": properties["size"]["description"].replace(
        "the model's native size", "the image's own size")}
    for name, prop in EditSettings.model_json_schema()["properties"].items():
        properties[name] = {**prop, "description": prop.get("description", "") + " (our setting; extra_body)"}
    properties["strength"]["default"] = OPENAI_EDIT_STRENGTH
    properties["input_fidelity"] = {"type": "string", "enum": list(OPENAI_EDIT_IGNORED["input_fidelity"]),
                                    "description": "Accepted and ignored."}
    image_text, mask_text = f"{IMAGE_DESCRIPTION}; {OPENAI_MASK_RULE}.", f"What to repaint: {OPENAI_MASK_RULE}."
    files = {"image": {"type": "string", "format": "binary", "description": image_text},
             "mask": {"type": "string", "format": "binary", "description": mask_text}}
    return {**generation, "title": "OpenAI image edit request", "properties": {**files, **properties},
            "required": ["image", "prompt"]}


# -- A1111's img2img ---------------------------------------------------------------------------------

def _flag(raw: dict[str, Any], name: str, problems: list[str]) -> Optional[bool]:
    """A1111's 0/1 (or true/false) switch; None when left out."""
    value = raw.get(name)
    if value is None:
        return None
    if value in (0, 1) and type(value) in (int, bool):
        return bool(value)
    problems.append(f"{name}={shown(value)} is not valid: 0 or 1 (false or true)")
    return None


def _init_image(raw: dict[str, Any], problems: list[str]) -> Optional[bytes]:
    images = raw.get("init_images")
    if not isinstance(images, list) or not images:
        problems.append(f"init_images={shown(images)} is not valid: send a list with the picture to edit, in base64")
        return None
    if len(images) > 1:
        problems.append(f"init_images has {len(images)} pictures: one is edited per request here; send one")
        return None
    try:
        return decode_base64("init_images", images[0])
    except SettingsError as exc:
        problems += exc.problems
        return None


def _resize_problem(mode: Any, picture: Optional[bytes], body: dict[str, Any]) -> Optional[str]:
    """Why resize_mode cannot be honoured, or None (reads the picture's size for resize_mode 0)."""
    valid = (f"{CROP_AND_RESIZE} ({RESIZE_MODES[CROP_AND_RESIZE]}: the picture covers width x height and is "
             f"centre-cropped) is what is done here; {JUST_RESIZE} ({RESIZE_MODES[JUST_RESIZE]}) is taken where it "
             "would not stretch the picture (no width/height, or the picture's own aspect ratio)")
    if mode in (None, CROP_AND_RESIZE):
        return None
    if mode != JUST_RESIZE or type(mode) is not int:
        name = f" ({RESIZE_MODES[mode]})" if type(mode) is int and mode in RESIZE_MODES else ""
        return f"resize_mode={shown(mode)}{name} is not available: {valid}"
    width, height = body.get("width"), body.get("height")
    if picture is None or not isinstance(width, int) or not isinstance(height, int):
        return None
    try:
        source = read_picture(picture, "init_images")
    except SettingsError:
        return None  # the library names what is wrong with the picture
    if source.width * height != width * source.height:
        return (f"resize_mode=0 ({RESIZE_MODES[JUST_RESIZE]}) would stretch the {source.width}x{source.height} "
                f"picture to {width}x{height}: {valid}")
    return None


def img2img_translate(raw: dict[str, Any], service: Service) -> tuple[dict[str, Any], int, list[str], Callable,
                                                                      dict[str, bytes], dict[str, Any]]:
    """(our body, n_iter, problems, renamer, pictures, the img2img fields as run) for an A1111 img2img request.
    Reads the picture (for resize_mode 0): call it off the event loop."""
    body, n_iter, problems, rename = _a1111_translate(raw, service)
    names = {"strength": "denoising_strength", "inpaint_padding": "inpaint_full_res_padding",
             "invert_mask": "inpainting_mask_invert", "inpaint_area": "inpaint_full_res"}
    for theirs, ours in IMG2IMG_NAMES.items():
        if raw.get(theirs) is not None:
            if theirs != ours and raw.get(ours) is not None and raw[ours] != raw[theirs]:
                problems.append(f"{theirs} and {ours} are the same setting with different values: send only one")
            body[ours] = raw[theirs]
    for ours in EditSettings.model_fields:  # our own names, for what A1111 has no word for (expand, fill)
        if ours not in body and raw.get(ours) is not None:
            body[ours] = raw[ours]
    invert, full_res = _flag(raw, "inpainting_mask_invert", problems), _flag(raw, "inpaint_full_res", problems)
    if invert is not None:
        body["invert_mask"] = invert
    if full_res is not None:
        body["inpaint_area"] = "masked" if full_res else "whole"
    for name, (off, why) in IMG2IMG_REFUSED.items():
        value = raw.get(name)
        if not any(value == allowed and type(value) is type(allowed) or value is allowed for allowed in off):
            problems.append(f"{name}={shown(value)} cannot be honoured: {why}; leave it out")

    pictures = {}
    picture = _init_image(raw, problems)
    if picture is not None:
        pictures["image"] = picture
    if raw.get("mask") is not None:
        try:
            pictures["mask"] = decode_base64("mask", raw["mask"])
        except SettingsError as exc:
            problems += exc.problems
    fill = raw.get("inpainting_fill")
    if fill is not None and (type(fill) is not int or fill not in INPAINTING_FILLS):
        problems.append(f"inpainting_fill={shown(fill)} is not valid: one of "
                        f"{', '.join(f'{k} ({v})' for k, v in INPAINTING_FILLS.items())}")
    elif fill not in (None, ORIGINAL_FILL) and raw.get("mask") is not None:
        problems.append(f"inpainting_fill={fill} ({INPAINTING_FILLS[fill]}) is not available: the masked area starts "
                        f"from the original picture here ({ORIGINAL_FILL}, {INPAINTING_FILLS[ORIGINAL_FILL]}); send "
                        f"{ORIGINAL_FILL}, or a higher denoising_strength to draw it more anew")
    resize = _resize_problem(raw.get("resize_mode"), picture, body)
    if resize:
        problems.append(resize)
    as_run = {"init_images": None, "mask": None, "resize_mode": raw.get("resize_mode", CROP_AND_RESIZE),
              "inpainting_fill": ORIGINAL_FILL if raw.get("mask") is not None else fill,
              "include_init_images": bool(raw.get("include_init_images", False))}
    return body, n_iter, problems, _merged_renamer(rename, names), pictures, as_run


def _merged_renamer(rename: Callable[[str], str], names: dict[str, str]) -> Callable[[str], str]:
    """txt2img's renamer, then img2img's names; the library's messages about `image` (which start with the
    word) name init_images instead, the rest of their words left alone."""
    more = _renamer(names)

    def renamed(problem: str) -> str:
        problem = more(rename(problem))
        return "init_images" + problem[len("image"):] if re.match(r"image\b", problem) else problem

    return renamed


def img2img_schema(served: list[str], max_n_iter: int, allow_compile: bool = False) -> dict[str, Any]:
    schema = a1111_schema(served, max_n_iter, allow_compile)
    edit = EditSettings.model_json_schema()["properties"]
    properties = {
        "init_images": {"type": "array", "minItems": 1, "maxItems": 1, "items": picture_schema("init_images",
                        IMAGE_DESCRIPTION), "description": "One picture to edit, in base64."},
        "mask": {**picture_schema("mask", MASK_DESCRIPTION), "type": ["string", "null"]},
        "denoising_strength": {**edit["strength"], "title": "Denoising strength"},
        "mask_blur": edit["mask_blur"],
        "inpainting_mask_invert": {"type": "integer", "enum": [0, 1], "default": 0},
        "inpaint_full_res": {"type": ["boolean", "integer"], "default": False,
                             "description": "Inpaint only the masked area (with its padding), at the model's size."},
        "inpaint_full_res_padding": edit["inpaint_padding"],
        "resize_mode": {"type": "integer", "enum": [JUST_RESIZE, CROP_AND_RESIZE], "default": CROP_AND_RESIZE,
                        "description": "1: crop and resize; 0 only where it would not stretch the picture."},
        "inpainting_fill": {"type": "integer", "enum": list(INPAINTING_FILLS), "default": ORIGINAL_FILL,
                            "description": "1 (original) with a mask; without one it has no effect."},
        "include_init_images": {"type": "boolean", "default": False},
    }
    return {**schema, "title": "A1111 img2img request", "properties": {**schema["properties"], **properties},
            "required": ["init_images", "prompt"]}


# -- the routes --------------------------------------------------------------------------------------

def install(app, service: Service, tasks: dict[str, tuple[int, int]]) -> None:
    """Add the edit routes to `app`; `tasks` is shared with txt2img, for A1111's progress."""
    served = list(service.models)
    openai_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": openai_edit_schema(served, service.allow_compile)}}}}
    a1111_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": img2img_schema(served, n_iter_cap(service), service.allow_compile)}}}}

    @app.post(OPENAI_EDIT_ROUTE, openapi_extra=openai_body, tags=["OpenAI-compatible"],
              responses=errors(400, 401, 409, 413, 415, 429, 500, 503),
              summary="OpenAI's image edits: edit a picture and answer with the images (waits for the job)",
              description=f"Bodies up to {MAX_EDIT_BODY_BYTES:,} bytes.")
    async def openai_edit(request: Request):
        refusal, fields, sent = await read_openai_form(request)
        if refusal is not None:
            return refusal
        refusal, body, rename, answer, pictures = await asyncio.to_thread(openai_edit_check, service, fields, sent)
        if refusal is not None:
            return refusal
        try:
            job, new = await asyncio.to_thread(service.submit, body, request.headers.get("idempotency-key"), pictures)
        except SettingsError as exc:
            return openai_refusal(exc, rename)
        except Rejected as exc:
            return rejected(exc)
        return await openai_answer(service, request, job, new, answer)

    @app.post(A1111_EDIT_ROUTE, openapi_extra=a1111_body, tags=["A1111-compatible"],
              responses=errors(400, 401, 413, 415, 422, 429, 500, 503),
              summary="AUTOMATIC1111's img2img (and inpainting): edit a picture and answer with the images",
              description=f"Bodies up to {MAX_EDIT_BODY_BYTES:,} bytes.")
    async def img2img(request: Request):
        raw = await read_json(request)
        if not isinstance(raw, dict):
            return _a1111_error(a1111_not_an_object(raw))
        body, n_iter, problems, rename, pictures, as_run = await asyncio.to_thread(img2img_translate, raw, service)
        if problems:
            refusal = await asyncio.to_thread(_refusal, problems, 422, service, body, rename, pictures)
            return _a1111_error(refusal)
        refusal, jobs = await asyncio.to_thread(a1111_submit, service, request, body, n_iter, rename, pictures)
        if refusal is not None:
            return refusal
        return await a1111_answer(service, request, raw, jobs, n_iter, tasks, as_run)
