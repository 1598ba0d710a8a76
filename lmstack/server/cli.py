"""`lmstack serve`: load the engine, serve it over HTTP, drain gracefully on SIGTERM/SIGINT.

On the first signal the server stops admitting work (/v1 answers 503, /ready turns 503 so a
load balancer routes elsewhere) but keeps listening, lets running requests finish for up to
--drain-timeout seconds, then shuts uvicorn down and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import typer

BUNDLED_NAME = "smollm2-135m-instruct"
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; larger heads get uvicorn's 400
logger = logging.getLogger("lmstack.server")


def served_name(model: str) -> str:
    """The name clients pass as `model`: the bundled model's, else the directory/file name."""
    if model == "bundled":
        return BUNDLED_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


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
        None, "--max-schema-bytes", help="Size of a response_format JSON schema (65536)"
    ),
    max_schema_depth: int | None = typer.Option(
        None, "--max-schema-depth", help="Nesting depth of a response_format JSON schema (32)"
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
    }
    limits = RequestLimits(**{name: value for name, value in bounds.items() if value is not None})
    _setup_logging(log_level)

    from lmstack.engine.async_engine import AsyncLLMEngine
    from lmstack.engine.config import EngineConfig
    from lmstack.server.app import create_app

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
        app = create_app(
            engine,
            name,
            api_key,
            max_body_bytes,
            docs_store,
            max_upload_bytes,
            limits=limits,
            body_timeout=body_timeout,
            max_concurrent_uploads=max_concurrent_uploads,
            allowed_origin=allowed_origin,
            metrics_public=metrics_public,
            ratings_db=ratings_db,  # preference collection (lmstack/align): /rate, /rate/qc
            max_note_chars=max_note_chars,
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
        server_class = _draining_server_class()
        server_class(server_config, app.state.server, drain_timeout).run()
    finally:
        engine.shutdown()


def uvicorn_config(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    header_timeout: float = 10.0,
    keep_alive_timeout: float = 5.0,
    limit_concurrency: int = 256,
):
    """Every uvicorn option `lmstack serve` sets, in one place (tests build theirs here too)."""
    import uvicorn

    from lmstack.server.transport import head_deadline_protocol

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # lmstack.server logs one JSON line per request instead
        timeout_graceful_shutdown=5,
        http=head_deadline_protocol(header_timeout),  # h11, with a deadline on each head
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=keep_alive_timeout,
        limit_concurrency=limit_concurrency,
    )


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def _draining_server_class():
    # Built on first use: uvicorn is imported lazily so `lmstack --help` stays fast.
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self, config, state, drain_timeout: float) -> None:
            super().__init__(config)
            self.state = state
            self.drain_timeout = drain_timeout
            self.drain_deadline: float | None = None

        def handle_exit(self, sig, frame) -> None:
            # Runs as a signal handler: only flag changes here, the loop acts on them in
            # on_tick. Not calling super() also keeps uvicorn from re-raising the signal on
            # exit, which would end the process with -SIGTERM instead of 0.
            if self.drain_deadline is not None:
                self.should_exit = self.force_exit = True
                return
            self.state.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout

        async def on_tick(self, counter: int) -> bool:
            if self.drain_deadline is not None and not self.should_exit:
                in_flight = self.state.in_flight
                if in_flight == 0:
                    logger.info('{"event": "drained"}')
                    self.should_exit = True
                elif time.monotonic() >= self.drain_deadline:
                    logger.warning(
                        '{"event": "drain_timeout", "in_flight": %d, "drain_timeout_s": %s}',
                        in_flight,
                        self.drain_timeout,
                    )
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer
