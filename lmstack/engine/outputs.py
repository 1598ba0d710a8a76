"""What the engine hands back each step, per request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    prompt_tokens: int
    new_token_ids: list[int]  # produced since the last output for this request
    new_text: str  # text delta since the last output (held back while it may be a stop string)
    text: str  # all output text so far
    token_ids: list[int]  # all output token ids so far
    finished: bool
    finish_reason: str | None = None
    new_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float = 0.0  # time.monotonic() values
    first_scheduled_time: float | None = None  # left the waiting queue (queue time ends)
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time
