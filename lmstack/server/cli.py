"""`lmstack serve`: load the engine, serve it over HTTP, drain gracefully on SIGTERM/SIGINT.

On the first signal the server stops admitting work (/v1 answers 503, /ready turns 503 so a
load balancer routes elsewhere) but keeps listening, lets running requests finish for up to
--drain-timeout seconds, then shuts uvicorn down and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import typer

BUNDLED_NAME = "smollm2-135m-instruct"
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
    _setup_logging(log_level)

    import uvicorn

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
        app = create_app(engine, name, api_key, max_body_bytes, docs_store, max_upload_bytes)
        if ratings_db is not None:  # preference collection (lmstack/align): /rate, /rate/qc
            from lmstack.align.web import rate_router

            app.include_router(rate_router(ratings_db))
        server_config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,  # lmstack.server logs one JSON line per request instead
            timeout_graceful_shutdown=5,
        )
        server_class = _draining_server_class()
        server_class(server_config, app.state.server, drain_timeout).run()
    finally:
        engine.shutdown()


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
