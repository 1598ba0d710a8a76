"""Running the server under uvicorn: its options, logging, and the graceful drain.

`lmstack serve` (lmstack/serve.py, the composition root) builds the app and runs it here.

On the first signal the server stops admitting work (/v1 answers 503, /ready turns 503 so a
load balancer routes elsewhere) but keeps listening, lets running requests finish for up to
--drain-timeout seconds, then shuts uvicorn down and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

BUNDLED_NAME = "smollm2-135m-instruct"
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; larger heads get uvicorn's 400
logger = logging.getLogger("lmstack.server")


def served_name(model: str) -> str:
    """The name clients pass as `model`: the bundled model's, else the directory/file name."""
    if model == "bundled":
        return BUNDLED_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


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


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def draining_server_class():
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
