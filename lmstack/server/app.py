"""The OpenAI-compatible HTTP app around one AsyncLLMEngine (vLLM's OpenAI server, small).

It serves the OpenAI API (and /v1/embeddings when given an embedder), vLLM's /tokenize,
/detokenize and /version, and the operational routes (/health, /ready, /metrics); it knows
no app: document Q&A, triage, ratings, the attention explainer and the web page are
mounted on it by the composition root (lmstack/serve.py), through `register_upload_route`
for routes that take large bodies.

Admission happens in one ASGI middleware in front of every route (admission.py: cross-site
checks -> 403/415, drain -> 503, API key -> 401, uploads -> 429, body size and time ->
413/408) so a refused request costs nothing; the routes then parse the body themselves, which
keeps every error, malformed JSON and bad UTF-8 included, a 400 in OpenAI's shape instead of
FastAPI's 422.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from lmstack.engine.async_engine import AsyncLLMEngine
from lmstack.engine.scheduler import QueueFullError
from lmstack.errors import ContextLengthError, EngineDeadError, InputError, LmstackError
from lmstack.httpapi import APIError, error_response, parse_body
from lmstack.server import protocol as p
from lmstack.server.admission import AdmissionMiddleware, allowed_origins
from lmstack.server.embeddings import EmbeddingLimits, EmbeddingService, add_embedding_routes
from lmstack.server.limits import RequestLimits
from lmstack.server.metrics import EmbeddingMetrics, ServerMetrics
from lmstack.server.serving import chat_response, completion_response
from lmstack.server.state import RequestRecord, ServerState
from lmstack.server.tokenization import add_tokenize_routes
from lmstack.version import __version__

logger = logging.getLogger("lmstack.server")

# A full queue drains at the pace of finishing requests: about a second is a fair first retry.
RETRY_AFTER_S = 1


def create_app(
    engine: AsyncLLMEngine,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    limits: RequestLimits | None = None,
    *,
    body_timeout: float = 60.0,
    max_concurrent_uploads: int = 2,
    allowed_origin: list[str] | tuple[str, ...] = (),
    metrics_public: bool = False,
    embedder=None,
    embedding_limits: EmbeddingLimits | None = None,
    lenient: bool = False,
) -> FastAPI:
    """The OpenAI app for one engine; several apps may share an engine (each has its own
    metrics). Admission (lmstack/server/admission.py) covers every route mounted on it.

    With `embedder` (lmstack.embed.Embedder, or anything with its methods) the app also
    serves /v1/embeddings (lmstack/server/embeddings.py) and lists the embedder's model.
    `lenient`: ignore request fields lmstack does not implement instead of refusing them
    (lmstack.server.fields)."""
    if api_key is not None and not api_key.strip():
        raise InputError(
            "--api-key is empty (LMSTACK_API_KEY too?): give a key, or leave both unset"
        )
    state = ServerState(
        engine=engine,
        served_model_name=served_model_name,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        metrics=ServerMetrics(engine, served_model_name),
        renderer=p.TokenRenderer(engine.tokenizer),
        max_request_tokens=engine.max_request_tokens,
        limits=(limits or RequestLimits()).resolved(engine.max_request_tokens),
        body_timeout_s=body_timeout,
        max_concurrent_uploads=max_concurrent_uploads,
        allowed_origins=allowed_origins(allowed_origin),
        metrics_public=metrics_public,
    )
    if embedder is not None:
        embedding_metrics = EmbeddingMetrics(state.metrics.registry, embedder.model_id)
        bounds = embedding_limits or EmbeddingLimits()
        state.embeddings = EmbeddingService(embedder, bounds, embedding_metrics)
    app = FastAPI(title="lmstack", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = state
    app.state.max_json_depth = state.limits.max_json_depth  # for lmstack.httpapi.parse_body
    app.state.lenient = lenient  # so is this
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
    return app


def register_upload_route(app: FastAPI, method: str, path: str, limit: int, option: str) -> None:
    """A route whose body may exceed --max-body-bytes: streamed within `limit` bytes (the
    flag `option` sets it) and counted against --max-concurrent-uploads."""
    state: ServerState = app.state.server
    state.body_limits[(method, path)] = (limit, option)
    state.upload_routes.add((method, path))


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
            state.metrics.reject("queue_full")
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


def _check_model(state: ServerState, model: str | None) -> None:
    state.check_model(model)


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
            root=state.engine.model_name,
            max_model_len=state.engine.max_model_len,
            dtype=state.engine.precision["dtype"],
            dtype_reason=state.engine.precision["reason"],
        )
        cards = [card]
        if state.embeddings is not None:
            cards.append(state.embeddings.card(state.created))
        return p.ModelList(data=cards).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, p.ChatCompletionRequest)
        _check_model(state, body.model)
        return await chat_response(state, request, body, _record(request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, p.CompletionRequest)
        _check_model(state, body.model)
        return await completion_response(state, request, body, _record(request))

    add_tokenize_routes(app, state)  # /tokenize, /detokenize, /version (vLLM's)
    if state.embeddings is not None:
        add_embedding_routes(app, state, state.embeddings)
