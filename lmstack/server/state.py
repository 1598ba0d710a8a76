"""What every route shares: the server's state, the per-request log record, API errors."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from lmstack.engine.async_engine import AsyncLLMEngine
from lmstack.server import protocol as p
from lmstack.server.metrics import ServerMetrics

logger = logging.getLogger("lmstack.server")


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields, raised anywhere in a route."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


@dataclass
class RequestRecord:
    """One /v1 request's JSON log line; the routes fill in the engine's side."""

    method: str
    path: str
    status: int | None = None
    id: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    queue_time_s: float | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None

    def emit(self) -> None:
        logger.info(json.dumps({"event": "request", **asdict(self)}))


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    served_model_name: str
    api_key: str | None
    max_body_bytes: int
    metrics: ServerMetrics
    renderer: p.TokenRenderer
    max_request_tokens: int  # prompt + output: the context window or the KV pool, if smaller
    draining: bool = False
    in_flight: int = 0  # /v1 requests admitted and not yet answered
    # (method, path) -> (bytes, the option that sets it): routes that take larger bodies
    # than --max-body-bytes, e.g. document uploads.
    body_limits: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    def room(self, prompt_tokens: int) -> int:
        """Output tokens left for a prompt; at least 1 so the engine names the real limit."""
        return max(1, self.max_request_tokens - prompt_tokens)
