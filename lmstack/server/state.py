"""What every route of the OpenAI server shares: its state and the per-request log record."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from lmstack.engine.async_engine import AsyncLLMEngine
from lmstack.httpapi import APIError
from lmstack.server import protocol as p
from lmstack.server.limits import RequestLimits
from lmstack.server.metrics import ServerMetrics

logger = logging.getLogger("lmstack.server")


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
    limits: RequestLimits = field(default_factory=RequestLimits)  # resolved by create_app
    draining: bool = False
    in_flight: int = 0  # /v1 and /rate/api requests admitted and not yet answered
    # (method, path) -> (bytes, the option that sets it): routes that take larger bodies
    # than --max-body-bytes, e.g. document uploads.
    body_limits: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    # Upload routes: they read their body as it streams in (spooled to disk, not held in
    # memory) while admission counts its bytes and holds it to --body-timeout; at most
    # max_concurrent_uploads of them run at once.
    upload_routes: set[tuple[str, str]] = field(default_factory=set)
    body_timeout_s: float = 60.0  # the whole body, from the end of the request head
    allowed_origins: tuple[str, ...] = ()  # scheme://host[:port], beside the served host
    metrics_public: bool = False  # with an API key, /metrics needs it too unless set
    max_concurrent_uploads: int = 2
    uploads_running: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    # /v1/embeddings (lmstack.server.embeddings.EmbeddingService) when the app has an
    # embedder; None: the route and its /v1/models entry are absent.
    embeddings: object | None = None

    def check_model(self, model: str | None) -> None:
        """A request's `model`: absent, or the served model's name (else 404)."""
        if model is not None and model != self.served_model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    def room(self, prompt_tokens: int) -> int:
        """Output tokens left for a prompt; at least 1 so the engine names the real limit."""
        return max(1, self.max_request_tokens - prompt_tokens)
