"""ASGI middleware around every HTTP front end of ours (`pixart-sigma serve` and the Ray Serve gateway).

- `BodyLimit`: 413 for request bodies over the limit (a route's own, where it has one), counted as they arrive.
- `SameMachineOnly`: without an API key, only this machine's own clients may use the server; a web page
  on another site, open in the same browser, can do nothing (see its docstring for each rule).
- `BearerAuth`: with an API key, every route but the open ones needs `Authorization: Bearer <key>`.
- `SecurityHeaders`: the page may not be framed, runs only its own scripts, and leaks no referrer.

`guarded(app, api_key, hosts, body_limit)` puts them together in the one order both front ends use.
"""

from __future__ import annotations

import hmac
from typing import Iterable, Mapping, Optional

from .protocol import error_response

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
OPEN_PATHS = ("/healthz",)  # reachable without the API key
PAGE_PATHS = ("/",)  # the page itself holds no data; it asks for the key when the server has one
SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
# The page's own files only: no inline script or style, no framing, no plugins, no form posts elsewhere.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")
DOCS_PATHS = ("/docs", "/redoc")  # FastAPI's API docs run an inline script from their own CDN: framing is still refused
DOCS_POLICY = "frame-ancestors 'none'"


def host_names(host: str) -> tuple[str, ...]:
    """The Host header names a server bound to `host` answers to: the loopback names and the address itself."""
    own = f"[{host.strip('[]')}]" if ":" in host else host
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, own.lower())))


def _host_name(headers: dict[bytes, bytes]) -> bytes:
    host = headers.get(b"host", b"").strip().lower()
    return host if host.endswith(b"]") else host.rsplit(b":", 1)[0]


class BodyLimit:
    """413 for request bodies over the limit, counted as they arrive (Content-Length may be absent or lie).

    `route_limits`: path -> a route's own limit (the routes that take pictures); every other path has `limit`.
    """

    def __init__(self, app, limit: int, route_limits: Optional[Mapping[str, int]] = None):
        self.app, self.limit, self.route_limits = app, limit, dict(route_limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.route_limits.get(scope["path"], self.limit)
        too_large = error_response(413, f"the request body is over {limit:,} bytes, the most {scope['path'][:100]} "
                                        "takes", code="body_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


class SameMachineOnly:
    """Without an API key the server trusts its own machine only, so a web page the user visits elsewhere
    cannot use it, whatever the request looks like:

    - the Host must be one of `hosts` (a DNS-rebinding page, whose Host is its own name, gets 421);
    - a request a browser marks as coming from another site or origin (`Sec-Fetch-Site` cross-site or
      same-site, or an `Origin` other than this server's) gets 403, GET included: only a navigation to
      the page itself may come from elsewhere (a link to the server still opens it; in a frame it is then
      refused by the page's frame-ancestors policy).
      Clients that are not browsers send neither header and are not affected;
    - a POST body must be JSON (what a cross-site form or a text/plain `fetch` cannot send without a
      preflight), else 415; only `multipart_paths` (the routes that take uploads) may also take
      multipart/form-data, which a cross-site form can send: there the Origin and Sec-Fetch-Site rule
      above is what refuses another site (browsers send Origin with every form POST).
    """

    def __init__(self, app, hosts: Optional[Iterable[str]], multipart_paths: Iterable[str] = ()):
        self.app = app
        self.hosts = None if hosts is None else {name.lower().encode() for name in hosts}
        self.multipart_paths = frozenset(multipart_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope):
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None and _host_name(headers) not in self.hosts:
            names = ", ".join(sorted(name.decode() for name in self.hosts))
            return error_response(421, f"this server answers only to {names}; give it an API key to serve other "
                                       "names", code="wrong_host")
        if self._from_elsewhere(scope, headers):
            return error_response(403, "this request came from another web site or origin; without an API key "
                                       "only this machine's own clients and the server's own page may use it",
                                  kind="permission_error", code="cross_origin")
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        multipart = kind == b"multipart/form-data" and scope["path"] in self.multipart_paths
        if scope["method"] == "POST" and has_body and kind != b"application/json" and not multipart:
            uploads = " (or multipart/form-data)" if scope["path"] in self.multipart_paths else ""
            return error_response(415, f"send the request body as JSON with 'Content-Type: application/json'{uploads}",
                                  code="unsupported_media_type")
        return None

    @staticmethod
    def _from_elsewhere(scope, headers: dict[bytes, bytes]) -> bool:
        site = headers.get(b"sec-fetch-site", b"").lower()
        origin = headers.get(b"origin")
        navigation = (scope["method"] == "GET" and scope["path"] in PAGE_PATHS
                      and headers.get(b"sec-fetch-mode", b"").lower() == b"navigate")
        if navigation:
            return False
        if site in (b"cross-site", b"same-site"):
            return True
        if origin is not None:
            own = b"http://" + headers.get(b"host", b"").strip().lower()
            # Browsers send Origin on every state-changing request ("null" from sandboxes and files).
            if origin.strip().lower() != own and (scope["method"].encode() not in SAFE_METHODS or site != b"same-origin"):
                return True
        return False


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


class SecurityHeaders:
    """Headers on every answer: no framing (clickjacking), only the page's own scripts and styles, no MIME
    sniffing, no referrer (job ids are in URLs)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy = (DOCS_POLICY if scope["path"] in DOCS_PATHS else PAGE_POLICY).encode()

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [(b"content-security-policy", policy), (b"x-frame-options", b"DENY"),
                         (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": [*message.get("headers", []),
                                                  *[(name, value) for name, value in added if name not in present]]}
            await send(message)

        await self.app(scope, receive, with_headers)


def guarded(app, api_key: Optional[str], hosts: Optional[Iterable[str]], body_limit: int,
            route_limits: Optional[Mapping[str, int]] = None, multipart_paths: Iterable[str] = ()):
    """`app` behind the body limit, the same-machine rules (when there is no API key) or the key, and the
    security headers (outermost, so refusals carry them too).

    `hosts`: the Host names accepted without a key (None: any, for a server not bound to loopback, which
    needs a key anyway). `route_limits`: routes with a larger body limit than `body_limit` (path -> bytes);
    `multipart_paths`: the routes that may take multipart/form-data.
    """
    wrapped = BodyLimit(app, body_limit, route_limits)
    wrapped = BearerAuth(wrapped, api_key) if api_key else SameMachineOnly(wrapped, hosts, multipart_paths)
    return SecurityHeaders(wrapped)
