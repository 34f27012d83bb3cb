"""The HTTP routes: a thin shell that turns requests into the service's jobs and jobs into JSON.

Errors have the one shape of protocol.py; the guards of guards.py stand in front of every route.
Nothing a client sends becomes a path: image names are made by the service and checked against
their pattern before a file is opened, and links in the images folder are not followed. An edit's
pictures arrive as bytes (pictures.py) and are stored under names the store makes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterable, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import SettingsError, __version__
from ..settings import shown
from .compat import reads_files
from .guards import LOOPBACK_NAMES, guarded
from .loras import LISTING_SCHEMA
from .pictures import BadForm, decode_base64, one_each, read_form, typed_fields
from .protocol import (EDIT_BODY_LIMITS, JOB_ROUTE, MAX_BODY_BYTES, MAX_EDIT_BODY_BYTES, MULTIPART_ROUTES, BadRequest,
                       Rejected, edit_request_schema, error_response, errors, multipart_schema, parse_json, read_json,
                       rejected, request_schema, settings_error, store_unavailable)
from .service import Service
from .store import CURSOR, JOB_ID, PICTURE_ROLES, StoreError

STATIC_DIR = Path(__file__).parent / "static"
SSE_POLL_SECONDS = 0.5  # only for a job with no events in memory
SSE_HEARTBEAT_SECONDS = 15.0
MAX_PAGE = 100


def create_app(service: Service, api_key: Optional[str] = None,
               hosts: Optional[Iterable[str]] = LOOPBACK_NAMES) -> FastAPI:
    """The routes; `asgi(app)` is what to serve. Without `api_key`, only `hosts` are accepted as Host names
    (None: any) and the same-machine rules apply (guards.py)."""
    from . import compat

    app = FastAPI(title="pixart-sigma", version=__version__,
                  description="PixArt-Sigma text-to-image generation as a service: jobs, progress, images.")
    app.state.service = service
    served = list(service.models)
    body_schema = request_schema(served, service.allow_compile)  # the settings of text-to-image, which the page's form is built from
    edit_schema = edit_request_schema(served, service.allow_compile)
    generation_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": edit_schema},
        "multipart/form-data": {"schema": multipart_schema(edit_schema)}}}}

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

    @app.exception_handler(BadForm)
    async def _bad_form(request: Request, exc: BadForm):
        return error_response(400, str(exc), code="invalid_multipart")

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError):
        return store_unavailable(f"{exc}; retry later")

    @app.exception_handler(404)
    async def _missing(request: Request, exc):
        return error_response(404, getattr(exc, "detail", None) or "not found", code="not_found")

    @app.exception_handler(405)
    async def _method(request: Request, exc):
        return error_response(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    def job_or_404(job_id: str):
        job = service.job(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise NotFound(f"no job {job_id[:64]!r}")
        return job

    class NotFound(Exception):
        pass

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return error_response(404, str(exc), code="not_found")

    @app.post(JOB_ROUTE, status_code=202, openapi_extra=generation_body,
              responses=errors(400, 401, 409, 413, 415, 422, 429, 503),
              summary="Queue a generation or an edit; answers at once with the job",
              description="JSON, with an edit's `image` and `mask` in base64; or multipart/form-data: the settings "
                          "as form fields (or one field `request` holding the JSON body) and the pictures as files "
                          f"`image` and `mask`. Bodies up to {MAX_EDIT_BODY_BYTES:,} bytes.")
    async def create_generation(request: Request):
        body, pictures = await read_job_request(request)
        key = request.headers.get("idempotency-key")
        if pictures or reads_files(body):  # the library reads them (and LoRA files): off the event loop
            job, new = await asyncio.to_thread(service.submit, body, key, pictures)
        else:
            job, new = service.submit(body, key)
        headers = {"Location": f"/v1/jobs/{job.id}"} | ({} if new else {"Idempotent-Replayed": "true"})
        return JSONResponse(service.view(job), status_code=202, headers=headers)

    @app.get("/v1/jobs", summary="Job history, newest first; pass a page's `next` as `before` for the older ones",
             responses=errors(401, 422))
    async def list_jobs(limit: int = Query(20, ge=1, le=MAX_PAGE),
                        before: Optional[str] = Query(None, max_length=80, pattern=f"^{CURSOR.pattern}$",
                                                      description="The `next` of the page before"),
                        offset: Optional[str] = Query(None, include_in_schema=False)):
        if offset is not None:  # refused rather than ignored: an old client would read page one forever
            message = ("offset is not taken: offsets repeat jobs while new ones arrive; pass the `next` of the "
                       "page you have as `before`")
            return error_response(422, message, param="offset", code="invalid_request", fields={"offset": [message]})
        jobs, total, following = service.store.page(limit, before)
        return {"jobs": [service.view(service.current(job)) for job in jobs], "total": total, "limit": limit,
                "next": following}

    @app.get("/v1/jobs/{job_id}", summary="One job: status, progress, seeds, images, error",
             responses=errors(401, 404))
    async def get_job(job_id: str):
        job = job_or_404(job_id)
        service.handed_out([job.id])  # a client polling for its result gets the image URLs here
        return service.view(job)

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

    @app.api_route("/v1/images/{name}", methods=["GET", "HEAD"], summary="A generated PNG with its settings in its metadata",
                   response_class=Response, responses={**errors(401, 404), 200: {"content": {"image/png": {}}}})
    async def get_image(name: str, request: Request):
        content = await asyncio.to_thread(service.store.read_image, name)
        if content is None:
            raise NotFound(f"no image {name[:80]!r}")
        headers = {"Cache-Control": "private, max-age=31536000, immutable"}
        if request.method == "HEAD":
            return Response(status_code=200, media_type="image/png",
                            headers={**headers, "Content-Length": str(len(content))})
        return Response(content, media_type="image/png", headers=headers)

    @app.get("/v1/schema", summary="The settings' JSON Schema, as this server accepts them")
    async def schema():
        return body_schema

    @app.get("/v1/loras", summary="The LoRAs requests may name: the served LoRA folder, each read",
             responses={200: {"description": "Each LoRA of the folder, or why it cannot be used", "content": {
                 "application/json": {"schema": LISTING_SCHEMA}}}},
             description="Each LoRA of the folder the server was started with (`serve --lora-dir`), read against "
                         "the default model's transformer: the name to give in `loras` (or in an A1111 prompt's "
                         "<lora:NAME:SCALE>), its path inside the folder, layout, ranks, targets, size and SHA-256; "
                         "one that cannot be used has `problem` saying why. Read again when a file of the folder "
                         "changes.")
    async def list_loras():
        return {"loras": [lora.view() for lora in await asyncio.to_thread(service.loras.listing)]}

    @app.get("/healthz", summary="Alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready: models loaded and warm, not draining, the job store writable",
             responses={503: {"description": "Starting, draining, or the job store cannot be written"}})
    async def readyz():
        if service.draining or not service.ready:
            return JSONResponse({"status": "draining" if service.draining else "starting"}, status_code=503)
        if not await asyncio.to_thread(service.store_writable):
            return JSONResponse({"status": "store_unwritable", "message": f"the job store {service.store.path} "
                                 "cannot be written (a full disk?): new jobs are refused"}, status_code=503)
        return {"status": "ready", "models": served}

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

    app.state.asgi = guarded(app, api_key, hosts, MAX_BODY_BYTES, EDIT_BODY_LIMITS, MULTIPART_ROUTES)
    return app


async def read_job_request(request: Request) -> tuple[Any, dict[str, bytes]]:
    """The job route's body and an edit's pictures (role -> bytes): JSON with base64 pictures, or multipart
    with the settings as form fields (or a `request` field holding the JSON) and the pictures as files."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data":
        fields, sent = await read_form(request)
        pictures = one_each(sent, {})
        if "request" not in fields:
            return typed_fields(fields), pictures
        if len(fields) > 1 or len(fields["request"]) > 1:
            others = sorted(name for name in fields if name != "request")
            raise SettingsError([f"request holds the settings as JSON: send them there or as form fields, not both "
                                 f"(also sent: {', '.join(others[:10]) or 'request again'})"])
        body = parse_json(fields["request"][0], "the form field 'request'")
    else:
        body = await read_json(request)
        pictures = {}
    if isinstance(body, dict):
        body = dict(body)
        problems = []
        for role in PICTURE_ROLES:
            if isinstance(body.get(role), str):
                try:
                    pictures[role] = decode_base64(role, body.pop(role))
                except SettingsError as exc:
                    problems += exc.problems
        if problems:
            raise SettingsError(problems)
    return body, pictures


def asgi(app: FastAPI):
    """The app with its body limit and authentication around it: what uvicorn serves."""
    return app.state.asgi


async def _events(service: Service, job_id: str, request: Request):
    """The queue position while it changes, then the job's events from the start, followed until it is done
    (woken by the worker)."""
    loop, woken = asyncio.get_running_loop(), asyncio.Event()
    progress = service.progress(job_id)
    if progress is not None:
        progress.listen(loop, woken)
    service.listen_queue(loop, woken)
    sent, position = 0, None
    try:
        while True:
            woken.clear()  # before reading, so an event emitted meanwhile wakes the next wait
            now = service.queue_position(job_id)
            if now is not None and now != position:
                position = now
                yield _sse("queued", {"position": now})
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
                job = service.job(job_id)
                if job is not None and (finished or job.done):
                    service.handed_out([job.id])
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
        service.forget_queue(loop, woken)
        if progress is not None:
            progress.forget(loop, woken)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


