"""Ray Serve: `serve run pixart_sigma.integrations.ray:app model_name=demo [replicas=N | min_replicas=A max_replicas=B] ...`

Two deployments:
- `Generator`: the replicas, each with one warm model, one generation at a time
  (`max_ongoing_requests=1`: GPU work is serial), behind a bounded queue (`max_queued_requests`).
  `check_health` proves the model can still generate (a tiny generation when it is idle), so Serve
  replaces a replica whose device has failed.
- `Gateway`: the HTTP routes, the synchronous ones of `pixart-sigma serve` that apply here:
  `POST /v1/images/generations` and `POST /v1/images/edits` (OpenAI's Images API and its image edits,
  multipart as OpenAI's, the same translations and messages as `pixart-sigma serve`),
  `GET /v1/schema`, `GET /healthz`. Every request is checked by the library's rules here, so bad
  input never reaches a replica; a random seed is drawn here too. It calls the replicas through a
  handle, so a full queue surfaces as `BackPressureError` and is answered with 429 and Retry-After
  in OpenAI's error shape (Serve's own answer would be a bare 503); a replica that dies mid-request
  is a 503 with Retry-After, which OpenAI's client retries by itself. Around the routes, the rules of
  `pixart-sigma serve` (`server.guards`): without an API key only this machine's own clients (loopback
  Host, no cross-site browser requests, JSON bodies only but multipart on the edits route), with one
  `Authorization: Bearer <key>`.
  Without a key the gateway starts only when Serve's HTTP proxy is known to bind a loopback address:
  a proxy reachable from other machines, or one whose address cannot be read, is refused (fail closed).
  `compile=true` is refused unless the app is built with `allow_compile=true`, as the service's
  `--allow-compile`. LoRAs: `extra_body={"loras": [{"name": ..., "scale": ...}]}` (the same translation as
  `pixart-sigma serve`'s) applies LoRAs of the replicas' LoRA folder (`lora_dir`, default
  $PIXART_SIGMA_HOME/loras where each replica runs): a path is refused here, a name the folder lacks by the
  replica (400 either way, the folder's place on the server left out).

Images come back as `b64_json`: nothing is stored, so there is no URL to give (`response_format=url`
is refused with a message saying so).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) as objects.
import asyncio
import base64
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from ... import (Cancelled, PixArtSigmaError, PixArtSigmaModel, SettingsError, __version__, quiet_libraries, random_seed,
                  read_settings)
from ...calls import check_call
from ...compiling import COMPILE_COST
from ...images import image_bytes
from ...settings import DEFAULT_MODEL, LOAD_SETTINGS, parse_settings, shown
from ...server.guards import SecurityHeaders, guarded, host_names
from ...server.edits import openai_edit_check, read_openai_form
from ...server.protocol import (MAX_BODY_BYTES, MAX_EDIT_BODY_BYTES, OPENAI_EDIT_ROUTE, BadRequest, error_response,
                                read_json, request_schema)
from ...server.compat import openai_content, openai_refusal, translate_openai
from ...server import API_KEY_ENV, is_loopback
from ...server.loras import ServedLoras
from ...server.service import validate_request

IMPORT_PATH = "pixart_sigma.integrations.ray:app"
PROBE = {"num_inference_steps": 1, "width": 64, "height": 64, "num_images_per_prompt": 1, "seed": 0}
PROBE_EVERY_SECONDS = 60.0  # an idle replica proves itself at most this often; a failure makes it prove itself at once
FIRST_RETRY_AFTER = 5  # seconds, before any generation has been timed
EDIT_LIMITS = {OPENAI_EDIT_ROUTE: MAX_EDIT_BODY_BYTES}  # the route that takes pictures; 1 MiB elsewhere


# -- the replicas ------------------------------------------------------------------------------------

class Generator:
    """One replica: one warm model, one generation at a time (Serve sends one request at a time)."""

    def __init__(self, load: dict[str, Any], threads: Optional[int] = None, lora_dir: Optional[str] = None):
        if threads:
            import torch

            torch.set_num_threads(threads)

        quiet_libraries()
        # clients name LoRAs of the folder, never a path
        self.model = PixArtSigmaModel(**load, lora_dir=lora_dir, lora_paths=False)
        self.model.generate("warm-up", **PROBE)  # kernels chosen, caches filled: the first request is not slower
        self._busy = threading.Lock()
        self._proven = time.monotonic()
        self._failed: Optional[str] = None  # the last unexpected failure, until a probe succeeds

    async def generate(self, prompt: str, settings: dict[str, Any],
                       pictures: Optional[dict[str, bytes]] = None) -> dict[str, Any]:
        """PNG bytes (settings inside) and seeds of `prompt`'s images; `settings` (and an edit's `pictures`, role ->
        bytes) were checked by the gateway."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._generate, prompt, settings, cancel, pictures)
        except asyncio.CancelledError:  # the client went away: stop at the next step
            cancel.set()
            raise

    def _generate(self, prompt: str, settings: dict[str, Any], cancel: threading.Event,
                  pictures: Optional[dict[str, bytes]] = None) -> dict[str, Any]:
        with self._busy:
            started = time.monotonic()
            try:
                images = self.model.generate(prompt, cancel=cancel, **(pictures or {}), **settings)
            except (SettingsError, Cancelled):
                raise
            except Exception as exc:
                self._failed = f"{type(exc).__name__}: {exc}"[:500]
                raise
            self._proven, self._failed = time.monotonic(), None
            return {"images": [image_bytes(image) for image in images],
                    "seeds": [read_settings(image)["seed"] for image in images],
                    "seconds": time.monotonic() - started}

    async def check_health(self) -> None:
        """Raise when the model cannot generate: Serve then replaces this replica."""
        if self._failed is None and time.monotonic() - self._proven < PROBE_EVERY_SECONDS:
            return
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        if not self._busy.acquire(blocking=False):
            return  # generating right now: the request in progress proves or disproves it
        try:
            self.model.generate("health check", **PROBE)
        except Exception as exc:
            self._failed = f"{type(exc).__name__}: {exc}"[:500]
            raise RuntimeError(f"the model cannot generate: {self._failed}") from None
        finally:
            self._busy.release()
        self._proven, self._failed = time.monotonic(), None


# -- the gateway -------------------------------------------------------------------------------------

class Checker:
    """What the gateway knows of the served model: its settings and the library's checks, without weights."""

    def __init__(self, load: dict[str, Any]):
        self.load = {"model_name": load["model_name"]}
        # On this machine's CPU: only the checkpoint's native size matters here, the replicas resolve the device.
        self.settings = PixArtSigmaModel.validate_and_transform({**self.load, "device": "cpu"})
        # The replicas resolve memory=auto on their own devices: a call that cannot run there (compile with a
        # streamed model) is refused by the replica, and answered 400 all the same (see `images`).
        self.memory_mode = load.get("memory", "auto")

    def validate_call(self, prompt: Any, /, *, image: Any = None, mask: Any = None,
                      **overrides: Any) -> tuple[str, dict[str, Any]]:
        """The checked prompt and per-call settings (an edit's pictures read), by the library's one check of a call."""
        return check_call(prompt, self.settings, overrides, native_size=self.settings["checkpoint"].native_size,
                          memory_mode=self.memory_mode, image=image, mask=mask)


class Catalog:
    """The served model for the OpenAI translation (server.compat's `Served`); `allow_compile`: whether a
    request may ask for compile=true (the operator's choice, as `pixart-sigma serve --allow-compile`)."""

    def __init__(self, load: dict[str, Any], allow_compile: bool = False, lora_dir: Optional[str] = None):
        self.default_model = load["model_name"]
        self.models = {self.default_model: Checker(load)}
        self.allow_compile = allow_compile
        # The replicas' folder, maybe on other machines: a name's form is checked here, the name by a replica.
        self.loras = ServedLoras(Path(lora_dir) if lora_dir else None, local=False)

    def validate(self, body: Any, pictures: Optional[dict[str, bytes]] = None) -> tuple[str, str, dict[str, Any]]:
        return validate_request(self.models, self.default_model, body, set_by=f"serve run {IMPORT_PATH} {{name}}=...",
                                allow_compile=self.allow_compile, pictures=pictures, loras=self.loras)


Rules = tuple[Optional[str], Optional[tuple[str, ...]]]  # guarded's api_key and hosts


def gateway_rules(api_key: Optional[str], proxy_host: Optional[str], unread: str = "it could not be read") -> Rules:
    """`server.guards.guarded`'s (api_key, hosts) for a gateway whose HTTP proxies bind `proxy_host`.

    With a key: any Host, the key checked. Without one, like `pixart-sigma serve`, only a proxy known to bind
    a loopback address is served (loopback Host names only); a proxy reachable from other machines is refused,
    and so is one whose host is unknown (None; `unread` says why): a remote client of a proxy on 0.0.0.0 could
    send `Host: 127.0.0.1`, so without the bound address the Host check alone proves nothing. Fail closed."""
    if api_key:
        return api_key, None
    if proxy_host is None:
        raise SettingsError([f"Serve's HTTP proxy host is unknown ({unread}), so nothing shows that only this "
                             "machine can reach the gateway, and without an API key it refuses to start: set an API "
                             f"key with the api_key argument or {API_KEY_ENV}, or make sure Serve's http_options "
                             "host is readable (Serve started with its HTTP proxy on, and this Ray's "
                             "ray.serve.context._get_global_client().http_config.host working: tested with Ray 2.60)"])
    if not is_loopback(proxy_host):
        raise SettingsError([f"Serve's HTTP proxy binds host={proxy_host!r}, reachable from other machines: set "
                             f"an API key with the api_key argument or {API_KEY_ENV} (or give Serve http_options "
                             "host 127.0.0.1)"])
    return None, host_names(proxy_host)


def read_proxy_host() -> tuple[Optional[str], str]:
    """(the host Serve's HTTP proxies bind (its `http_options`), "") or (None, why it cannot be read)."""
    try:
        from ray.serve.context import _get_global_client  # Serve has no public reader of its http_options

        host = _get_global_client().http_config.host
    except Exception as exc:
        return None, f"reading it failed: {type(exc).__name__}: {str(exc)[:200]}"
    if not isinstance(host, str) or not host:
        return None, f"Serve's http_options host is {host!r}"  # None: Serve's HTTP proxies are off
    return host, ""


def proxy_host() -> Optional[str]:
    """The host Serve's HTTP proxies bind (its `http_options`), or None when it cannot be read."""
    return read_proxy_host()[0]


class Guards:
    """ASGI middleware: the gateway's app behind `server.guards.guarded`, with the rules this process's
    `Gateway` set (`rules`). They are set late because the app is built at import, before the Gateway's
    arguments reach its replica; until then every HTTP request is refused (503): fail closed."""

    rules: Optional[Rules] = None  # class-wide: one Gateway per replica process

    def __init__(self, app):
        self.app = app
        self.built: tuple[Any, Any] = (None, None)  # (rules, the app guarded by them)

    async def __call__(self, scope, receive, send):
        rules = Guards.rules
        if rules is None:
            if scope["type"] != "http":  # lifespan
                return await self.app(scope, receive, send)
            refusal = error_response(503, "the gateway is not configured yet", kind="server_error",
                                     code="not_configured", headers={"Retry-After": "5"})
            return await SecurityHeaders(refusal)(scope, receive, send)
        if self.built[0] is not rules:
            self.built = (rules, guarded(self.app, *rules, MAX_BODY_BYTES, route_limits=EDIT_LIMITS,
                                         multipart_paths=(OPENAI_EDIT_ROUTE,)))
        return await self.built[1](scope, receive, send)


api = FastAPI(title="pixart-sigma on Ray Serve", version=__version__,
              description="PixArt-Sigma text-to-image generation on Ray Serve: OpenAI's Images API.")
api.add_middleware(Guards)


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest):
    return error_response(400, str(exc), code="invalid_json")


@api.exception_handler(404)
async def _missing(request: Request, exc):
    return error_response(404, f"no route {request.url.path[:100]}: this deployment serves POST "
                          f"/v1/images/generations, POST {OPENAI_EDIT_ROUTE}, GET /v1/schema and GET /healthz",
                          code="not_found")


@api.exception_handler(405)
async def _method(request: Request, exc):
    return error_response(405, f"{request.method} is not allowed on {request.url.path[:100]}", code="method_not_allowed")


def no_urls():
    # Defined above the Gateway: below it, the replica (which gets the class pickled) found no such name.
    return error_response(400, "response_format='url' is not available here: this deployment keeps no images to "
                          "link to; ask for 'b64_json' (the default here)", param="response_format",
                          code="invalid_settings")


@serve.ingress(api)
class Gateway:
    """The HTTP routes; every request checked here, then generated by a `Generator` replica."""

    def __init__(self, generator, load: dict[str, Any], replicas: int, request_timeout_s: float,
                 api_key: Optional[str] = None, allow_compile: bool = False, lora_dir: Optional[str] = None):
        # Read here, in the replica, where the rules apply; without a key an unreadable host refuses the deploy.
        host, unread = (None, "") if api_key else read_proxy_host()
        Guards.rules = gateway_rules(api_key, host, unread)
        self.generator = generator
        self.catalog = Catalog(load, allow_compile, lora_dir)
        self.replicas = replicas
        self.timeout = request_timeout_s
        self.seconds: Optional[float] = None  # a running average of one generation, for Retry-After

    def retry_after(self, waiting: int = 1) -> int:
        each = self.seconds if self.seconds is not None else FIRST_RETRY_AFTER
        return max(1, math.ceil(each * max(1, waiting) / max(1, self.replicas)))

    @api.post("/v1/images/generations", summary="OpenAI's Images API: make images and answer with them")
    async def images(self, request: Request):
        raw = await read_json(request)
        refusal, body, rename, answer = translate_openai(raw, self.catalog)
        if refusal is not None:
            return refusal
        if raw.get("response_format") == "url":
            return no_urls()
        try:
            model_name, prompt, settings = self.catalog.validate(body)
        except SettingsError as exc:
            return openai_refusal(exc, rename)
        return await self._answer(model_name, prompt, settings, rename)

    @api.post(OPENAI_EDIT_ROUTE, summary="OpenAI's image edits: edit a picture and answer with the images",
              description=f"multipart/form-data as OpenAI's; bodies up to {MAX_EDIT_BODY_BYTES:,} bytes.")
    async def edits(self, request: Request):
        refusal, fields, sent = await read_openai_form(request)
        if refusal is not None:
            return refusal
        # The pictures are read here (off the event loop), so a bad one never reaches a replica.
        refusal, body, rename, _, pictures = await asyncio.to_thread(openai_edit_check, self.catalog, fields, sent)
        if refusal is not None:
            return refusal
        if fields.get("response_format") == ["url"]:
            return no_urls()
        try:
            model_name, prompt, settings = await asyncio.to_thread(self.catalog.validate, body, pictures)
        except SettingsError as exc:
            return openai_refusal(exc, rename)
        return await self._answer(model_name, prompt, settings, rename, pictures)

    async def _answer(self, model_name: str, prompt: str, settings: dict[str, Any], rename,
                      pictures: Optional[dict[str, bytes]] = None):
        """Generate on a replica and answer in OpenAI's shape, or with the error a client can act on."""
        if settings["seed"] == -1:  # drawn here, so a retried request makes the same images
            settings["seed"] = random_seed()
        try:
            result = await asyncio.wait_for(self.generator.generate.remote(prompt, settings, pictures), self.timeout)
        except BackPressureError as exc:
            waiting = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 1
            return error_response(429, f"the queue is full ({shown(waiting)} requests waiting for "
                                  f"{self.replicas} replica(s)); retry later", kind="rate_limit_error",
                                  code="queue_full", headers={"Retry-After": str(self.retry_after(waiting))})
        except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
            return error_response(503, "the replica making these images stopped before it finished "
                                  f"({type(exc).__name__}); Serve is replacing it: retry", kind="server_error",
                                  code="replica_died", headers={"Retry-After": str(self.retry_after())})
        except asyncio.TimeoutError:
            return error_response(504, f"no answer in {self.timeout:g} s: the request was cancelled; retry, or ask "
                                  "for fewer or smaller images", kind="server_error", code="timeout",
                                  headers={"x-should-retry": "false"})
        except SettingsError as exc:  # what the replica's weights cannot do (memory=auto made concrete there), or
            # a LoRA its folder lacks: said without the folder's place on the server
            return openai_refusal(self.catalog.loras.private_error(exc), rename)
        except PixArtSigmaError as exc:  # raised by the model (Serve re-raises it here as the same class)
            return error_response(500, f"generation failed: {str(exc).splitlines()[0][:500]}", kind="server_error",
                                  code="generation_failed", headers={"x-should-retry": "false"})
        self.seconds = result["seconds"] if self.seconds is None else 0.8 * self.seconds + 0.2 * result["seconds"]
        items = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in result["images"]]
        return JSONResponse(openai_content(time.time(), items, prompt, result["seeds"], settings["width"],
                                           settings["height"], model_name))

    @api.get("/v1/schema", summary="The settings' JSON Schema, as this deployment accepts them")
    async def schema(self):
        return request_schema(list(self.catalog.models), self.catalog.allow_compile)

    @api.get("/healthz", summary="Alive")
    async def healthz(self):
        return {"status": "ok"}


# -- the application builder --------------------------------------------------------------------------

ARGUMENTS = {
    **{name: f"the {name} setting of every replica's model (see `pixart-sigma schema`)" for name in LOAD_SETTINGS},
    "replicas": "a fixed number of replicas (default 1); or autoscale with min_replicas and max_replicas",
    "min_replicas": "autoscaling: the fewest replicas (0 lets the deployment scale to zero)",
    "max_replicas": "autoscaling: the most replicas",
    "target_ongoing_requests": "autoscaling: requests per replica (running and queued) it aims for (default 2)",
    "max_queued_requests": "requests that may wait for a replica before the next is answered 429 (default 8)",
    "num_gpus": "GPUs per replica (default 1 when the device is a GPU, or auto on a machine with one; else 0)",
    "num_cpus": "CPUs per replica, and its torch threads on the CPU (default 1)",
    "request_timeout_s": "seconds a request may take, queue included, before it is cancelled (default 300)",
    "health_check_period_s": "seconds between Serve's health checks of each replica (default 10)",
    "api_key": f"the key clients must send as 'Authorization: Bearer <key>' (default: {API_KEY_ENV} where the app "
               "is built); without one only this machine's own clients may use the gateway, and only when "
               "Serve's HTTP proxy binds a loopback address",
    "allow_compile": f"true lets requests ask for compile=true ({COMPILE_COST}); default false: such requests "
                     "are refused (400)",
    "lora_dir": "the LoRA folder every replica looks requests' LoRA names up in, on the machine it runs on (default: "
                "$PIXART_SIGMA_HOME/loras there); requests name LoRAs of it, never a path",
}


def _number(args: dict[str, Any], name: str, kind: type, low: float, high: float, default: Any,
            problems: list[str]) -> Any:
    value = args.get(name, default)
    if value is None:
        return None
    try:
        number = kind(value) if not isinstance(value, bool) else None
        if number is None or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        if kind is float and not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"{name}={shown(value)} is not valid: it must be {'a whole number' if kind is int else 'a number'}"
                        f" from {low:g} to {high:g}")
        return default
    if not low <= number <= high:
        problems.append(f"{name}={shown(value)} is not valid: it must be from {low:g} to {high:g}")
        return default
    return number


def _boolean(args: dict[str, Any], name: str, default: bool, problems: list[str]) -> bool:
    """A boolean argument: true or false (a config file's YAML boolean, or `key=true` on `serve run`'s line)."""
    value = args.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    problems.append(f"{name}={shown(value)} is not valid: it must be true or false")
    return default


def options(args: dict[str, Any]) -> dict[str, Any]:
    """The builder's arguments, checked: every problem in one ValueError that names the argument and its rule."""
    if not isinstance(args, dict):
        raise ValueError(f"the application's arguments must be a mapping of name to value, not {type(args).__name__}")
    problems: list[str] = []
    unknown = sorted(set(args) - set(ARGUMENTS))
    if unknown:
        problems.append(f"{', '.join(map(str, unknown))}: not an argument of {IMPORT_PATH}; the arguments are:\n"
                        + "\n".join(f"    {name}: {text}" for name, text in ARGUMENTS.items()))
    load = {name: args[name] for name in LOAD_SETTINGS if name in args}
    load.setdefault("model_name", DEFAULT_MODEL)
    # The syntax of every setting here (each replica resolves device and dtype where it runs), and the
    # checkpoint, without reading weights.
    for check in (parse_settings, Checker):
        try:
            check(load)
        except SettingsError as exc:
            problems += [problem for problem in exc.problems if problem not in problems]
    autoscale = "min_replicas" in args or "max_replicas" in args
    if autoscale and "replicas" in args:
        problems.append("replicas and min_replicas/max_replicas exclude each other: give a fixed number of "
                        "replicas, or autoscaling bounds")
    replicas = _number(args, "replicas", int, 1, 1000, 1, problems)
    low = _number(args, "min_replicas", int, 0, 1000, 1, problems)
    high = _number(args, "max_replicas", int, 1, 1000, max(low or 1, 1), problems)
    if autoscale and low is not None and high is not None and low > high:
        problems.append(f"min_replicas={low} is more than max_replicas={high}")
    api_key = args["api_key"] if "api_key" in args else os.environ.get(API_KEY_ENV) or None
    if ("api_key" in args or api_key is not None) and not (
            isinstance(api_key, str) and api_key and api_key.isascii() and api_key.isprintable()
            and api_key == api_key.strip()):
        source = "api_key" if "api_key" in args else API_KEY_ENV
        # The value is a secret: never shown.
        problems.append(f"{source} is not valid: it must be a non-empty string of printable ASCII characters, "
                        "without leading or trailing spaces")
    device = str(load.get("device", "auto")).strip().lower()
    gpu_default = 0 if device == "cpu" else 1 if device != "auto" else int(_has_cuda())
    found = {
        "load": load, "autoscale": autoscale, "replicas": replicas, "min_replicas": low, "max_replicas": high,
        "target_ongoing_requests": _number(args, "target_ongoing_requests", float, 0.1, 1000, 2.0, problems),
        "max_queued_requests": _number(args, "max_queued_requests", int, 1, 100_000, 8, problems),
        "num_gpus": _number(args, "num_gpus", float, 0, 16, gpu_default, problems),
        "num_cpus": _number(args, "num_cpus", float, 0, 1024, 1, problems),
        "request_timeout_s": _number(args, "request_timeout_s", float, 1, 86_400, 300.0, problems),
        "health_check_period_s": _number(args, "health_check_period_s", float, 1, 3600, 10.0, problems),
        "api_key": api_key,
        "allow_compile": _boolean(args, "allow_compile", False, problems),
        "lora_dir": _folder(args, "lora_dir", problems),
    }
    if problems:
        raise ValueError(f"{IMPORT_PATH} cannot start:\n" + "\n".join(f"  - {problem}" for problem in problems))
    return found


def _folder(args: dict[str, Any], name: str, problems: list[str]) -> Optional[str]:
    """A folder argument: a path as text (it is looked at where the replicas run, not here)."""
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        problems.append(f"{name}={shown(value)} is not valid: it must be the path of a folder")
        return None
    return value


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def app(args: dict[str, Any]):
    """The Serve application: `serve run pixart_sigma.integrations.ray:app model_name=demo replicas=2`."""
    found = options(args)
    scaling = ({"autoscaling_config": {"min_replicas": found["min_replicas"], "max_replicas": found["max_replicas"],
                                       "target_ongoing_requests": found["target_ongoing_requests"]}}
               if found["autoscale"] else {"num_replicas": found["replicas"]})
    threads = max(1, int(found["num_cpus"])) if not found["num_gpus"] else None
    generator = serve.deployment(Generator, name="Generator").options(
        max_ongoing_requests=1, max_queued_requests=found["max_queued_requests"],
        health_check_period_s=found["health_check_period_s"],
        ray_actor_options={"num_gpus": found["num_gpus"], "num_cpus": found["num_cpus"]}, **scaling,
    ).bind(found["load"], threads, found["lora_dir"])
    replicas = found["max_replicas"] if found["autoscale"] else found["replicas"]
    return serve.deployment(Gateway, name="Gateway").options(
        num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0},
    ).bind(generator, found["load"], replicas, found["request_timeout_s"], api_key=found["api_key"],
           allow_compile=found["allow_compile"], lora_dir=found["lora_dir"])
