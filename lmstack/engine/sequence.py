"""One request's state as it moves through the engine: waiting -> running -> finished.

Shared by the block manager (which blocks hold its KV), the scheduler (what to compute
next) and the engine (sampling, detokenizing, timings).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from lmstack.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason:
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    TIMEOUT = "timeout"  # the request's deadline passed (queued or running)
    ABORT = "abort"  # abort(request_id), e.g. a client that disconnected
    ERROR = "error"  # this request failed (e.g. its grammar rejected every token)


_seq_counter = itertools.count()


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower is served first
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the request times out
    seq_id: int = field(default_factory=lambda: next(_seq_counter))

    token_ids: list[int] = field(init=False)  # prompt + output
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    # Per-token log-probability records, filled by the sampler when params.logprobs is set.
    logprobs: list = field(default_factory=list)
    # The engine's per-request working state, one owner each.
    decoder: Any = None  # stream detokenizer (llm_engine.make_sequence)
    text: str = ""  # output text so far (stop strings cut it)
    emitted: int = 0  # characters of `text` already handed out
    sent_tokens: int = 0  # output tokens already handed out
    sent_logprobs: int = 0  # logprob records already handed out
    flushed: bool = False  # the detokenizer's tail was added at the finish
    stop_string_hit: bool = False
    matcher: Any = None  # grammar matcher (structured output), or None
    generator: Any = None  # torch.Generator of a seeded request (sampler)
    error: str | None = None  # why the request failed (finish_reason "error")
    block_hashes: list = field(default_factory=list)  # prefix-cache hashes of full blocks
    hashed_blocks: int = 0  # blocks whose hash is published (kv_cache)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before the next one can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: str, now: float | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.monotonic() if now is None else now
