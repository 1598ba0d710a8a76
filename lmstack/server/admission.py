"""Admission: what every request passes before a route runs, in one pure-ASGI middleware.

In this order, each refusal in OpenAI's error shape and costing nothing:

    Host not a name of this server, on loopback (rebinding)  403 host_not_allowed
    Origin neither this server nor --allowed-origin          403 origin_not_allowed
    draining (/v1, /rate/api, /tokenize, /detokenize)        503
    API key missing or wrong (those but /rate/api, /metrics) 401 invalid_api_key
    POST/PUT/PATCH/DELETE that a page on another site could  415 unsupported_media_type
      send: anything but application/json, except multipart
      or no body with `X-Requested-With: lmstack`
    --max-concurrent-uploads uploads already running         429 too_many_uploads
    body over --max-body-bytes (--max-upload-bytes)          413 body_too_large
    body not complete within --body-timeout                  408 body_timeout, then close

A browser sends a cross-site POST without asking first only with a "simple" content type
(text/plain, form-urlencoded, multipart); JSON or a custom header makes it ask (a CORS
preflight), which this server grants only to --allowed-origin. So requiring one of them
keeps a page elsewhere from uploading, deleting or asking through a local lmstack.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
from urllib.parse import urlsplit

from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from lmstack.errors import InputError
from lmstack.httpapi import error_response
from lmstack.server.state import RequestRecord, ServerState

WORK_PREFIXES = ("/v1/", "/rate/api/")  # drained, counted in flight, logged
# vLLM's routes outside /v1 that run the model's tokenizer: work, and keyed like /v1.
WORK_PATHS = frozenset({"/tokenize", "/detokenize"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = ("X-Requested-With", "lmstack")  # the bundled pages send it with uploads
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}
UPLOAD_RETRY_AFTER_S = 5  # an upload takes seconds to ingest

Origin = tuple[str, str, int]  # (scheme, host, port), host lowercase without brackets


def parse_origin(value: str) -> Origin | None:
    """'scheme://host[:port]' as a tuple; None for anything else ('null', paths, ...)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def allowed_origins(values) -> tuple[str, ...]:
    """--allowed-origin values checked and written as browsers send Origin."""
    out = []
    for value in values or ():
        origin = parse_origin(value)
        if origin is None:
            raise InputError(
                f"--allowed-origin must be scheme://host[:port] "
                f"(e.g. https://chat.example.com), got {value!r}"
            )
        scheme, host, port = origin
        host = f"[{host}]" if ":" in host else host
        out.append(f"{scheme}://{host}" + ("" if port == DEFAULT_PORTS[scheme] else f":{port}"))
    return tuple(out)


def _split_host(value: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname, parts.port) if parts.hostname else None
    except ValueError:
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(address) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except (TypeError, ValueError):
        return address == "localhost"


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class AdmissionMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware, which buffers streams and hides disconnects).

    Refuses before reading the body, buffers the body within its limit and deadline (upload
    routes stream theirs, counted on the way), counts the requests in flight for the drain,
    and logs one JSON line per /v1 or /rate/api request and per refusal.
    """

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state
        self.origins = {parse_origin(o) for o in state.allowed_origins}
        self.origin_hosts = {origin[1] for origin in self.origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        method, path = scope["method"], scope["path"]
        work = path.startswith(WORK_PREFIXES) or path in WORK_PATHS
        upload = (method, path) in state.upload_routes
        record = RequestRecord(method, path)
        if work:
            scope["lmstack.record"] = record
        started = time.monotonic()
        response_started = False

        async def send_logged(message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                record.status, response_started = message["status"], True
            await send(message)

        admitted = uploading = False
        try:
            try:
                refusal = self._refusal(scope, work, upload)
                if refusal is not None:
                    raise _Refused(refusal)
                admitted, uploading = work, upload
                state.in_flight += admitted
                state.uploads_running += uploading
                app_receive = await self._body(scope, receive, upload)
                await self.app(scope, app_receive, send_logged)
            except _Refused as refused:
                record.error = json.loads(refused.response.body)["error"]["message"]
                if not response_started:
                    await refused.response(scope, receive, send_logged)
        except (_ClientGone, ClientDisconnect):
            record.status = 499  # nginx's "client closed request"
        except Exception:
            record.status = record.status or 500  # answered by Starlette's outer error handler
            raise
        finally:
            state.in_flight -= admitted
            state.uploads_running -= uploading
            if work or record.error:
                record.latency_s = round(time.monotonic() - started, 4)
                record.emit()

    # ------------------------------------------------------------------ refusals

    def _refusal(self, scope, work: bool, upload: bool) -> Response | None:
        state = self.state
        refusal = self._cross_site(scope)
        if refusal is not None:
            return refusal
        if work and state.draining:
            state.metrics.reject("draining")
            return error_response(503, "server is shutting down", "service_unavailable")
        path = scope["path"]
        keyed = path.startswith("/v1/") or path in WORK_PATHS
        keyed = keyed or (path == "/metrics" and not state.metrics_public)
        if keyed and state.api_key is not None:
            auth = _header(scope, b"authorization") or b""
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(
                given.strip(), state.api_key.encode()
            ):
                extra = " (or start the server with --metrics-public)" if path == "/metrics" else ""
                return error_response(
                    401,
                    f"invalid or missing API key (send 'Authorization: Bearer <key>'){extra}",
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        refusal = self._content_type(scope)
        if refusal is None and upload and state.uploads_running >= state.max_concurrent_uploads:
            message = (
                f"{state.uploads_running} document uploads are running, the limit is "
                f"{state.max_concurrent_uploads} (--max-concurrent-uploads); "
                f"retry in {UPLOAD_RETRY_AFTER_S} s"
            )
            headers = {"Retry-After": str(UPLOAD_RETRY_AFTER_S)}
            refusal = error_response(
                429, message, "rate_limit_error", code="too_many_uploads", headers=headers
            )
        return refusal

    def _cross_site(self, scope) -> Response | None:
        """Host must name this server and Origin, when sent, be this server or allowed."""
        served = scope.get("server") or (None, None)
        raw_host = _header(scope, b"host")
        host = None
        # DNS rebinding aims a browser at a server on this machine's loopback under a name
        # of the attacker's: there the Host must be a name of this server. On another
        # interface the server is meant to be reached by names (a proxy, a Kubernetes
        # Service, a LAN name), so any Host passes and only Origin is checked.
        if raw_host is not None:  # HTTP/1.0 may omit it; a browser never does
            value = raw_host.decode("latin-1")
            host = _split_host(value)
            if _is_loopback(served[0]) and (
                host is None
                or not (
                    host[0] in LOOPBACK_NAMES
                    or host[0] == served[0]
                    or host[0] in self.origin_hosts
                    or _is_ip(host[0])
                )
            ):
                return _forbidden(
                    f"Host {value!r} is not a name of this server; to serve under it, start "
                    f"the server with --allowed-origin http://{value} (or https://)",
                    "host_not_allowed",
                )
        raw_origin = _header(scope, b"origin")
        if raw_origin is None:
            return None
        value = raw_origin.decode("latin-1")
        origin = parse_origin(value)
        if origin is not None and origin in self.origins:
            return None
        scheme = scope.get("scheme", "http")
        if origin is not None and origin[0] == scheme:
            if host is not None and (host[0], host[1] or DEFAULT_PORTS[scheme]) == origin[1:]:
                return None  # the page came from the very name and port asked for now
            if origin[2] == served[1] and (origin[1] in LOOPBACK_NAMES or origin[1] == served[0]):
                return None
        allow = value if origin is not None else "scheme://host[:port]"
        return _forbidden(
            f"Origin {value!r} may not use this server: a page on another site cannot send it "
            f"requests; to allow a site, start the server with --allowed-origin {allow}",
            "origin_not_allowed",
        )

    def _content_type(self, scope) -> Response | None:
        method = scope["method"]
        if method not in STATE_CHANGING:
            return None
        given = (_header(scope, b"content-type") or b"").decode("latin-1")
        kind = given.split(";")[0].strip().lower()
        if kind == "application/json":
            return None
        marked = (_header(scope, CSRF_HEADER[0].lower().encode()) or b"").lower() == b"lmstack"
        length = _header(scope, b"content-length")
        bodyless = not kind and length in (None, b"0") and not _header(scope, b"transfer-encoding")
        if marked and (kind == "multipart/form-data" or bodyless):
            return None
        got = f"Content-Type {given!r}" if given else "no Content-Type"
        header = ": ".join(CSRF_HEADER)
        message = (
            f"{method} {scope['path']} takes 'Content-Type: application/json' (or "
            f"multipart/form-data, or no body, with the header '{header}'), got {got}: a page "
            f"on another site could send anything else"
        )
        return error_response(415, message, "invalid_request_error", code="unsupported_media_type")

    # ------------------------------------------------------------------ the body

    async def _body(self, scope, receive, upload: bool):
        """receive() for the app: the whole body buffered, or for uploads counted as it goes."""
        state = self.state
        default = (state.max_body_bytes, "--max-body-bytes")
        limit, option = state.body_limits.get((scope["method"], scope["path"]), default)
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _Refused(_too_large(f"request body is {int(declared)} bytes", limit, option))
        deadline = asyncio.get_running_loop().time() + state.body_timeout_s
        size, done = 0, False

        async def counted():
            nonlocal size, done
            if done:
                return await receive()  # after the body: disconnects, for streaming responses
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _Refused(_timed_out(size, state.body_timeout_s)) from None
            if message["type"] == "http.disconnect":
                if not upload:
                    raise _ClientGone
                return message  # Starlette's form parser raises ClientDisconnect
            size += len(message.get("body", b""))
            if size > limit:
                # uvicorn reads and drops the rest, so the client still gets to read the 413.
                raise _Refused(_too_large("request body is larger than that", limit, option))
            done = not message.get("more_body", False)
            return message

        if upload:
            return counted
        chunks: list[bytes] = []
        while not done:
            chunks.append((await counted()).get("body", b""))
        return _replay(b"".join(chunks), receive)


def _forbidden(message: str, code: str) -> Response:
    return error_response(403, message, "permission_error", code=code)


def _too_large(what: str, limit: int, option: str = "--max-body-bytes") -> Response:
    message = f"the limit is {limit} bytes ({option}); {what}"
    return error_response(413, message, "invalid_request_error", code="body_too_large")


def _timed_out(size: int, seconds: float) -> Response:
    message = (
        f"the request body did not arrive within {seconds:g} s (--body-timeout); {size} bytes came"
    )
    # Close: the client is still sending, and a slow one should not keep the connection.
    headers = {"Connection": "close"}
    return error_response(
        408, message, "invalid_request_error", code="body_timeout", headers=headers
    )


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _replay(body: bytes, receive):
    """receive() that hands the buffered body to the app, then passes through (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
