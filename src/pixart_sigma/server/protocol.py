"""What every HTTP route of ours shares: the error shape, reading a JSON body, the generation request's schema.

Every error has one shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`, plus
`fields` (field name -> messages) when settings were refused, so a form can show each message
next to its field. The service's routes, the OpenAI and A1111 routes and the Ray Serve gateway all
answer through these functions.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse

from .. import SettingsError
from ..settings import LOAD_SETTINGS, MAX_PROMPT_CHARS, EditSettings, Settings

MAX_BODY_BYTES = 1 << 20
# The routes that take an edit's pictures, and the larger bodies they may send: an image and a mask together,
# uploaded or in base64 (which makes 4 bytes of 3). Every other route keeps MAX_BODY_BYTES.
JOB_ROUTE = "/v1/generations"
OPENAI_EDIT_ROUTE = "/v1/images/edits"
A1111_EDIT_ROUTE = "/sdapi/v1/img2img"
MULTIPART_ROUTES = (JOB_ROUTE, OPENAI_EDIT_ROUTE)  # the only routes that read multipart/form-data
MAX_EDIT_BODY_BYTES = 48 << 20
EDIT_BODY_LIMITS = {route: MAX_EDIT_BODY_BYTES for route in (*MULTIPART_ROUTES, A1111_EDIT_ROUTE)}
STORE_RETRY_AFTER = 30  # seconds a client is asked to wait while the job store cannot be used


class Rejected(Exception):
    """A request the service will not take now; `status` is the HTTP status, `reason` a metrics label and the
    error's code."""

    def __init__(self, status: int, reason: str, message: str, retry_after: Optional[int] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after, self.param = status, reason, message, retry_after, param


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "null"]},
                   "fields": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}}}}}


def errors(*statuses: int) -> dict[int, dict]:
    """OpenAPI declarations of the error answers a route gives (one shape for all)."""
    reasons = {400: "Malformed request", 401: "Missing or wrong API key",
               403: "From another web site or origin (server without an API key)", 404: "Not found", 409: "Conflict",
               413: f"Body over {MAX_BODY_BYTES:,} bytes ({MAX_EDIT_BODY_BYTES:,} on the routes that take pictures)",
               415: "Body not sent as application/json (or multipart/form-data where a route takes uploads)",
               421: "Not a loopback Host name (server without an API key)", 422: "Invalid settings, each named in error.fields",
               429: "Queue full; see Retry-After", 500: "The job failed",
               503: "Draining, or the job store cannot be written now; see Retry-After"}
    return {status: {"description": reasons[status], "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for status in statuses}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None, fields: Optional[dict[str, list[str]]] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if fields:
        body["fields"] = fields
    headers = dict(headers or {})
    if status not in (408, 409, 429) and status < 500:
        headers.setdefault("x-should-retry", "false")  # OpenAI's client would retry some 4xx otherwise
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def settings_error(exc: SettingsError, status: int = 422) -> JSONResponse:
    fields = exc.by_field()
    return error_response(status, str(exc), param=next(iter(fields)), code="invalid_settings", fields=fields)


def store_unavailable(message: str, code: str = "store_unavailable") -> JSONResponse:
    """503 for work the job store cannot take or give now (a full disk, an I/O error): worth a retry later."""
    return error_response(503, message, kind="server_error", code=code, headers={"Retry-After": str(STORE_RETRY_AFTER)})


def rejected(exc: Rejected) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    kind = "rate_limit_error" if exc.status == 429 else "server_error" if exc.status >= 500 else "invalid_request_error"
    return error_response(exc.status, exc.message, kind=kind, param=exc.param, code=exc.reason, headers=headers)


def json_number(text: str):
    """JSON Schema counts 7.0 as an integer, and so do we: whole numbers arrive as int."""
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**63 else value


def parse_json(raw: bytes | str, what: str = "the request body") -> Any:
    """JSON as a request sends it (empty: null); BadRequest naming `what` otherwise."""
    try:
        return json.loads(raw or b"null", parse_float=json_number)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


async def read_json(request: Request) -> Any:
    return parse_json(await request.body())


class BadRequest(Exception):
    pass


def request_schema(served: list[str], allow_compile: bool = False) -> dict[str, Any]:
    """The body of POST /v1/generations: the prompt and every per-call setting, model_name among those served,
    compile only true where the operator allowed it."""
    schema = Settings.model_json_schema()
    properties = {"prompt": {"type": "string", "title": "Prompt", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
                             "description": "What to draw."}}
    for name, prop in schema["properties"].items():
        if name in LOAD_SETTINGS and name != "model_name":
            continue
        properties[name] = prop
    properties["model_name"] = {**schema["properties"]["model_name"], "enum": served, "default": served[0]}
    properties["model_name"].pop("examples", None)
    if not allow_compile:
        properties["compile"] = {**properties["compile"], "const": False, "description":
                                 properties["compile"]["description"] + " Refused here: the operator has not allowed it."}
    return {"type": "object", "title": "Generation request", "properties": properties, "required": ["prompt"],
            "additionalProperties": False}




def picture_schema(role: str, what: str) -> dict[str, Any]:
    """A picture in a JSON body: base64 text, plain or as a data: URL."""
    return {"type": "string", "title": role.capitalize(), "contentEncoding": "base64",
            "description": f"{what}: a PNG, JPEG or WebP file in base64, plain or as a data: URL "
                           f"(data:image/png;base64,...)."}


IMAGE_DESCRIPTION = "The picture to edit (image-to-image; with a mask, inpainting; with expand, outpainting)"
MASK_DESCRIPTION = ("What to repaint, the image's size: white, or for a mask with transparency its fully transparent "
                    "pixels")


def edit_request_schema(served: list[str], allow_compile: bool = False) -> dict[str, Any]:
    """The body of POST /v1/generations with an edit's fields: the pictures (base64) and the edit settings."""
    schema = request_schema(served, allow_compile)
    edit = {"image": picture_schema("image", IMAGE_DESCRIPTION), "mask": picture_schema("mask", MASK_DESCRIPTION),
            **EditSettings.model_json_schema()["properties"]}
    return {**schema, "title": "Generation or edit request", "properties": {**schema["properties"], **edit}}


def multipart_schema(json_schema: dict[str, Any]) -> dict[str, Any]:
    """The same body as multipart/form-data: each field a form field, and the pictures as files."""
    properties = {name: prop for name, prop in json_schema["properties"].items() if name not in ("image", "mask")}
    return {**json_schema, "properties": {**properties, "image": {"type": "string", "format": "binary",
                                                                  "description": IMAGE_DESCRIPTION},
                                          "mask": {"type": "string", "format": "binary",
                                                   "description": MASK_DESCRIPTION}}}
