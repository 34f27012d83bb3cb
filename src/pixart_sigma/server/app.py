"""The HTTP routes: a thin shell that turns requests into the service's jobs and jobs into JSON.

Every error has one shape, OpenAI's: `{"error": {"message", "type", "param", "code"}}`, plus
`fields` (field name -> messages) when settings were refused, so a form can show each message
next to its field. Nothing a client sends becomes a path: image names are made by the service
and checked against their pattern before a file is opened.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import SettingsError, __version__
from ..settings import LOAD_SETTINGS, MAX_PROMPT_CHARS, Settings, shown
from .service import Rejected, Service
from .store import IMAGE_NAME, JOB_ID

MAX_BODY_BYTES = 1 << 20
STATIC_DIR = Path(__file__).parent / "static"
OPEN_PATHS = ("/healthz",)  # reachable without the API key
PAGE_PATHS = ("/",)  # the page itself holds no data; it asks for the key when the server has one
SSE_POLL_SECONDS = 0.5  # only for a job with no events in memory
SSE_HEARTBEAT_SECONDS = 15.0
MAX_PAGE = 100


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "null"]},
                   "fields": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}}}}}


def errors(*statuses: int) -> dict[int, dict]:
    """OpenAPI declarations of the error answers a route gives (one shape for all)."""
    reasons = {400: "Malformed request", 401: "Missing or wrong API key", 404: "Not found", 409: "Conflict",
               413: f"Body over {MAX_BODY_BYTES:,} bytes", 415: "Body not sent as application/json",
               421: "Not a loopback Host name (server without an API key)", 422: "Invalid settings, each named in error.fields",
               429: "Queue full; see Retry-After", 500: "The job failed", 503: "Draining or not ready"}
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


def rejected(exc: Rejected) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    kind = "rate_limit_error" if exc.status == 429 else "server_error" if exc.status >= 500 else "invalid_request_error"
    return error_response(exc.status, exc.message, kind=kind, param=exc.param, code=exc.reason, headers=headers)


class BodyLimit:
    """413 for request bodies over the limit, counted as they arrive (Content-Length may be absent or lie)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body is over {self.limit:,} bytes", code="body_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


class SameMachineOnly:
    """Without an API key the server trusts its own machine only, so a web page the user visits elsewhere
    cannot use it: POST bodies must be JSON (a cross-site form or text/plain body is refused with 415) and,
    when bound to loopback, the Host must be a loopback name (a DNS-rebinding page is refused with 421)."""

    LOOPBACK_NAMES = (b"127.0.0.1", b"localhost", b"[::1]")

    def __init__(self, app, check_host: bool):
        self.app, self.check_host = app, check_host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").rsplit(b":", 1)[0] if not headers.get(b"host", b"").endswith(b"]") \
            else headers.get(b"host", b"")
        if self.check_host and host.lower() not in self.LOOPBACK_NAMES:
            response = error_response(421, "this server answers only to 127.0.0.1, localhost or [::1]; "
                                           "give it an API key to serve other names", code="wrong_host")
            return await response(scope, receive, send)
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        if scope["method"] == "POST" and has_body and kind != b"application/json":
            response = error_response(415, "send the request body as JSON with 'Content-Type: application/json'",
                                      code="unsupported_media_type")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BearerAuth:
    """Every route but /healthz (and the page's own files) needs `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS + PAGE_PATHS or scope["path"].startswith("/static/"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      kind="authentication_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


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


def create_app(service: Service, api_key: Optional[str] = None, loopback: bool = True) -> FastAPI:
    from . import compat

    app = FastAPI(title="pixart-sigma", version=__version__,
                  description="PixArt-Sigma text-to-image generation as a service: jobs, progress, images.")
    app.state.service = service
    served = list(service.models)
    body_schema = request_schema(served)
    generation_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}

    @app.exception_handler(SettingsError)
    async def _settings(request: Request, exc: SettingsError):
        return settings_error(exc)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected):
        return rejected(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_query(request: Request, exc: RequestValidationError):
        fields: dict[str, list[str]] = {}
        for problem in exc.errors():
            name = str(problem["loc"][-1]) if problem.get("loc") else "request"
            fields.setdefault(name, []).append(f"{name}={shown(problem.get('input'))} is not valid: {problem['msg']}")
        return error_response(422, "; ".join(m for ms in fields.values() for m in ms), param=next(iter(fields)),
                              code="invalid_request", fields=fields)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return error_response(400, str(exc), code="invalid_json")

    @app.exception_handler(404)
    async def _missing(request: Request, exc):
        return error_response(404, getattr(exc, "detail", None) or "not found", code="not_found")

    @app.exception_handler(405)
    async def _method(request: Request, exc):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    def job_or_404(job_id: str):
        job = service.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise NotFound(f"no job {job_id[:64]!r}")
        return job

    class NotFound(Exception):
        pass

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error_response(404, str(exc), code="not_found")

    @app.post("/v1/generations", status_code=202, openapi_extra=generation_body,
              responses=errors(400, 401, 409, 413, 415, 422, 429, 503),
              summary="Queue a generation; answers at once with the job")
    async def create_generation(request: Request):
        body = await read_json(request)
        job, new = service.submit(body, request.headers.get("idempotency-key"))
        headers = {"Location": f"/v1/jobs/{job.id}"} | ({} if new else {"Idempotent-Replayed": "true"})
        return JSONResponse(service.view(job), status_code=202, headers=headers)

    @app.get("/v1/jobs", summary="Job history, newest first", responses=errors(401, 422))
    async def list_jobs(limit: int = Query(20, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=2**62)):
        jobs, total = service.store.page(limit, offset)
        following = offset + len(jobs)
        return {"jobs": [service.view(job) for job in jobs], "total": total, "limit": limit, "offset": offset,
                "next_offset": following if following < total else None}

    @app.get("/v1/jobs/{job_id}", summary="One job: status, progress, seeds, images, error",
             responses=errors(401, 404))
    async def get_job(job_id: str):
        return service.view(job_or_404(job_id))

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a job: a queued one at once, a running one within a step",
                status_code=202, responses=errors(401, 404, 409))
    async def cancel_job(job_id: str):
        job = job_or_404(job_id)
        if not job.done:
            job = service.cancel(job_id)
            if job.status in ("queued", "running", "cancelled"):
                return JSONResponse(service.view(job), status_code=202)
        return error_response(409, f"job {job_id} has already finished ({job.status})", code="job_finished")

    @app.get("/v1/jobs/{job_id}/events", summary="Server-sent events: queue position, each step, done",
             response_class=StreamingResponse, responses=errors(401, 404))
    async def job_events(job_id: str, request: Request):
        job_or_404(job_id)
        return StreamingResponse(_events(service, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/images/{name}", summary="A generated PNG with its settings in its metadata",
             response_class=FileResponse, responses=errors(401, 404))
    async def get_image(name: str):
        path = service.store.image_dir / name
        if not IMAGE_NAME.fullmatch(name) or not path.is_file():
            raise NotFound(f"no image {name[:80]!r}")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=31536000, immutable"})

    @app.get("/v1/schema", summary="The settings' JSON Schema, as this server accepts them")
    async def schema():
        return body_schema

    @app.get("/healthz", summary="Alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready: models loaded and warm, not draining", responses={503: {"description": "Starting or draining"}})
    async def readyz():
        if service.ready and not service.draining:
            return {"status": "ready", "models": served}
        return JSONResponse({"status": "draining" if service.draining else "starting"}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        service.update_metrics()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    compat.install(app, service)

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    wrapped = SameMachineOnly(BodyLimit(app, MAX_BODY_BYTES), check_host=loopback and not api_key)
    if api_key:
        wrapped = BearerAuth(wrapped, api_key)
    app.state.asgi = wrapped
    return app


def asgi(app: FastAPI):
    """The app with its body limit and authentication around it: what uvicorn serves."""
    return app.state.asgi


async def _events(service: Service, job_id: str, request: Request):
    """Replay the job's events from the start, then follow them until it is done (woken by the worker)."""
    loop, woken = asyncio.get_running_loop(), asyncio.Event()
    progress = service.progress(job_id)
    if progress is not None:
        progress.listen(loop, woken)
    sent = 0
    try:
        while True:
            woken.clear()  # before reading, so an event emitted meanwhile wakes the next wait
            events = progress.events if progress else []
            finished = False
            while sent < len(events):
                event = events[sent]
                sent += 1
                if event["event"] == "done":
                    finished = True
                    break
                yield _sse(event["event"], {k: v for k, v in event.items() if k != "event"})
            if finished or progress is None:  # no events in memory: a job from before a restart
                job = service.store.get(job_id)
                if job is not None and (finished or job.done):
                    yield _sse("done", service.view(job))
                    return
            try:
                await asyncio.wait_for(woken.wait(), SSE_HEARTBEAT_SECONDS if progress else SSE_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                if progress is not None:
                    yield ": keep-alive\n\n"
    finally:
        if progress is not None:
            progress.forget(loop, woken)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


