"""The OpenAI-compatible HTTP app around one AsyncLLMEngine (vLLM's OpenAI server, small).

Admission happens in one ASGI middleware in front of every route (admission.py: cross-site
checks -> 403/415, drain -> 503, API key -> 401, uploads -> 429, body size and time ->
413/408) so a refused request costs nothing; the routes then parse the body themselves, which
keeps every error, malformed JSON and bad UTF-8 included, a 400 in OpenAI's shape instead of
FastAPI's 422.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from lmstack.engine.async_engine import AsyncLLMEngine
from lmstack.engine.scheduler import QueueFullError
from lmstack.errors import ContextLengthError, EngineDeadError, InputError, LmstackError
from lmstack.server import protocol as p
from lmstack.server.admission import AdmissionMiddleware, allowed_origins
from lmstack.server.bodies import check_json_depth, request_limits
from lmstack.server.limits import RequestLimits
from lmstack.server.metrics import ServerMetrics
from lmstack.server.serving import chat_response, completion_response
from lmstack.server.state import APIError, RequestRecord, ServerState, error_response

logger = logging.getLogger("lmstack.server")

# A full queue drains at the pace of finishing requests: about a second is a fair first retry.
RETRY_AFTER_S = 1


def create_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    docs_store: str | None = None,
    max_upload_bytes: int = 50_000_000,
    limits: RequestLimits | None = None,
    *,
    body_timeout: float = 60.0,
    max_concurrent_uploads: int = 2,
    allowed_origin: list[str] | tuple[str, ...] = (),
    metrics_public: bool = False,
    ratings_db: str | Path | None = None,
    max_note_chars: int = 2000,
) -> FastAPI:
    """The app for one engine; several apps may share an engine (each has its own metrics).

    With `ratings_db` it also serves the rating page and its API (/rate, lmstack/align).
    """
    if api_key is not None and not api_key.strip():
        raise InputError(
            "--api-key is empty (LMSTACK_API_KEY too?): give a key, or leave both unset"
        )
    state = ServerState(
        engine=engine,
        served_model_name=served_model_name,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        metrics=ServerMetrics(engine),
        renderer=p.TokenRenderer(engine.tokenizer),
        max_request_tokens=engine.engine.max_request_tokens,
        limits=(limits or RequestLimits()).resolved(engine.engine.max_request_tokens),
        body_timeout_s=body_timeout,
        max_concurrent_uploads=max_concurrent_uploads,
        allowed_origins=allowed_origins(allowed_origin),
        metrics_public=metrics_public,
    )
    app = FastAPI(title="lmstack", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(AdmissionMiddleware, state=state)
    if state.allowed_origins:  # outside admission: preflights and refusals get CORS headers
        from starlette.middleware.cors import CORSMiddleware

        headers = ["authorization", "content-type", "x-requested-with"]
        origins = list(state.allowed_origins)
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=headers
        )
    _add_error_handlers(app, state)
    _add_routes(app, state)
    _add_web(app, state, docs_store, max_upload_bytes)
    if ratings_db is not None:  # preference collection (lmstack/align): /rate, /rate/qc
        from lmstack.align.web import rate_router

        app.include_router(rate_router(ratings_db, max_note_chars))
    return app


# ---------------------------------------------------------------------------- errors


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        _record(request).error = str(exc)
        return error_response(exc.status, str(exc), exc.kind, exc.param, exc.code)

    @app.exception_handler(LmstackError)
    async def input_error(request: Request, exc: LmstackError):
        _record(request).error = str(exc)
        if isinstance(exc, EngineDeadError):  # the step thread stopped: a restart is needed
            return error_response(503, str(exc), "server_error", None, "engine_dead")
        if isinstance(exc, QueueFullError):
            state.metrics.rejected.labels(reason="queue_full").inc()
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            return error_response(429, str(exc), "rate_limit_error", None, "queue_full", headers)
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return error_response(400, str(exc), "invalid_request_error", code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_response(500, f"{type(exc).__name__}: {exc}", "server_error")


def _record(request: Request) -> RequestRecord:
    record = request.scope.get("lmstack.record")
    if record is None:  # a route outside /v1
        record = request.scope["lmstack.record"] = RequestRecord(request.method, request.url.path)
    return record


async def _parse(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})") from exc
    check_json_depth(text, request_limits(request).max_json_depth)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = _describe(exc)
        raise APIError(400, message, param=param) from exc


def _describe(exc: ValidationError) -> tuple[str, str | None]:
    """One line for pydantic's errors: the field, what is wrong, and the value given."""
    errors = exc.errors()
    first = errors[0]
    loc = first["loc"]
    if len(errors) > 1:
        # A union member that failed reports one error per alternative; name the field they
        # share rather than one alternative's complaint.
        shared = loc
        for err in errors[1:]:
            n = 0
            while n < min(len(shared), len(err["loc"])) and shared[n] == err["loc"][n]:
                n += 1
            shared = shared[:n]
        if shared:
            loc = shared
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    where = where.lstrip(".") or "body"
    if first["type"] == "missing":
        return f"{where}: field required", where
    got = json.dumps(first.get("input"), default=str)
    got = got if len(got) <= 80 else got[:77] + "..."
    what = "matches none of the accepted types" if loc != first["loc"] else first["msg"]
    return f"{where}: {what}, got {got}", where


def _reject_constant(name: str):
    # json.loads accepts NaN and Infinity; a NaN temperature would pass every range check.
    raise ValueError(f"{name} is not a valid JSON number")


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.served_model_name:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {state.served_model_name!r}",
            param="model",
            code="model_not_found",
        )


# ---------------------------------------------------------------------------- web page


def _add_web(app: FastAPI, state: ServerState, docs_store: str | None, upload_bytes: int) -> None:
    """The page at / and the endpoints only it and apps use: documents, attention."""
    from lmstack.docqa.web import docs_router
    from lmstack.server.attention_api import attention_router
    from lmstack.server.ui import add_web_page

    state.body_limits[("POST", "/v1/docs")] = (upload_bytes, "--max-upload-bytes")
    state.upload_routes.add(("POST", "/v1/docs"))
    app.include_router(docs_router(state.engine, docs_store))
    app.include_router(attention_router(state.engine))
    add_web_page(app)


# ---------------------------------------------------------------------------- routes


def _add_routes(app: FastAPI, state: ServerState) -> None:
    def engine_alive() -> bool:
        # The step thread is the engine's heartbeat: if it died, nothing will ever finish.
        return state.engine.is_alive

    @app.get("/health")
    async def health():
        if not engine_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining or not engine_alive():
            status = "draining" if state.draining else "engine stopped"
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        body = state.metrics.render()  # engine stats are a snapshot: no waiting
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = p.ModelCard(
            id=state.served_model_name,
            created=state.created,
            root=str(state.engine.engine.config.model),
            max_model_len=state.engine.engine.max_model_len,
            dtype=state.engine.precision["dtype"],
            dtype_reason=state.engine.precision["reason"],
        )
        return p.ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, p.ChatCompletionRequest)
        _check_model(state, body.model)
        return await chat_response(state, request, body, _record(request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, p.CompletionRequest)
        _check_model(state, body.model)
        return await completion_response(state, request, body, _record(request))

    @app.post("/v1/triage")
    async def triage(request: Request):
        # Support-ticket triage (lmstack/triage) on this server's engine, in a worker thread.
        from starlette.concurrency import run_in_threadpool

        from lmstack.triage.service import TriageRequest, TriageService

        body = await _parse(request, TriageRequest)
        if getattr(app.state, "triage", None) is None:
            app.state.triage = TriageService(state.engine)
        return await run_in_threadpool(app.state.triage.handle, body)
