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
from ..settings import LOAD_SETTINGS, MAX_PROMPT_CHARS, Settings

MAX_BODY_BYTES = 1 << 20
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
               413: f"Body over {MAX_BODY_BYTES:,} bytes", 415: "Body not sent as application/json",
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


def _number(text: str):
    """JSON Schema counts 7.0 as an integer, and so do we: whole numbers arrive as int."""
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 2**63 else value


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw or b"null", parse_float=_number)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


class BadRequest(Exception):
    pass


def request_schema(served: list[str]) -> dict[str, Any]:
    """The body of POST /v1/generations: the prompt and every per-call setting, model_name among those served."""
    schema = Settings.model_json_schema()
    properties = {"prompt": {"type": "string", "title": "Prompt", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
                             "description": "What to draw."}}
    for name, prop in schema["properties"].items():
        if name in LOAD_SETTINGS and name != "model_name":
            continue
        properties[name] = prop
    properties["model_name"] = {**schema["properties"]["model_name"], "enum": served, "default": served[0]}
    properties["model_name"].pop("examples", None)
    return {"type": "object", "title": "Generation request", "properties": properties, "required": ["prompt"],
            "additionalProperties": False}


