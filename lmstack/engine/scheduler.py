"""Decides, each step, which sequences run and how many of their tokens the model computes.

Policy (nano-vllm / vLLM v1 style, one unified token budget per step):
- running sequences first, most important first: a decode costs one token, a partly
  prefilled prompt continues its chunked prefill with whatever budget is left;
- when the KV pool runs out, the least important running sequence (highest priority number,
  latest arrival) is preempted: its blocks are freed and it goes back to waiting, to be
  recomputed later (its prefix may still hit the cache);
- then waiting sequences are admitted in (priority, arrival) order until the sequence cap,
  the token budget or the KV pool stops the head of the queue. Nothing behind a blocked head
  is admitted, so a small low-priority request cannot starve a large high-priority one.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from lmstack.engine.config import EngineConfig
from lmstack.engine.kv_cache import BlockManager
from lmstack.engine.sequence import FinishReason, Sequence, SequenceStatus
from lmstack.errors import InputError, LmstackError


class QueueFullError(LmstackError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429/503)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        super().__init__(f"waiting queue is full ({bound} requests); retry later")


@dataclass
class SchedulerConfig:
    """The scheduler's share of EngineConfig, whose defaults it takes (one set of defaults)."""

    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens  # decode tokens count 1
    max_waiting: int = EngineConfig.max_waiting  # bound of the waiting queue
    max_model_len: int = 8192  # the engine sets it from the model's window


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # running first, then admitted
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting this step
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _order(seq: Sequence) -> tuple[int, float, int]:
    # seq_id breaks ties so the order is total and never compares Sequence objects.
    return (seq.priority, seq.arrival_time, seq.seq_id)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        # Heap of (priority, arrival_time, seq_id, seq): lowest priority number first, FCFS
        # within a priority class. Removal (abort, timeout) rebuilds it: it is bounded by
        # max_waiting plus preempted sequences, so O(n) is cheap and keeps len() honest.
        self.waiting: list[tuple[int, float, int, Sequence]] = []
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.num_timeouts = 0
        self.num_rejected = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def waiting_seqs(self) -> list[Sequence]:
        """Waiting sequences in the order they would be admitted."""
        return [entry[3] for entry in sorted(self.waiting)]

    def get(self, request_id: str) -> Sequence | None:
        return self.requests.get(request_id)

    # ---- intake -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            self.num_rejected += 1
            raise QueueFullError(self.config.max_waiting)
        if seq.request_id in self.requests:
            raise InputError(f"request id {seq.request_id!r} is already in flight")
        if len(seq) == 0:
            raise InputError("prompt is empty; at least one token is needed")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(seq) > min(self.config.max_model_len, capacity):
            # Such a prompt could never be scheduled and would block the queue head forever.
            raise InputError(
                f"prompt is {len(seq)} tokens; the limit is {self.config.max_model_len} "
                f"(context window) and {capacity} (KV cache)"
            )
        seq.status = SequenceStatus.WAITING
        self.requests[seq.request_id] = seq
        self._push_waiting(seq)

    def _push_waiting(self, seq: Sequence) -> None:
        heapq.heappush(self.waiting, (seq.priority, seq.arrival_time, seq.seq_id, seq))

    def _remove_waiting(self, doomed: list[Sequence]) -> None:
        ids = {s.seq_id for s in doomed}
        self.waiting = [e for e in self.waiting if e[2] not in ids]
        heapq.heapify(self.waiting)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        now = time.monotonic() if now is None else now
        out = SchedulerOutput()
        self._expire(now, out)
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        self.running.sort(key=_order)
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop as someone else's victim
            if self._never_fits(seq):
                self._end(seq, FinishReason.LENGTH, now, out)
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:
                continue  # budget spent (or nothing to compute until the engine samples)
            while not bm.ensure_slots(seq, n):
                victim = max(self.running, key=_order)
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n

        # After a preemption the pool is known to be tight; admitting now would only take
        # blocks the running sequences need next step and preempt again (vLLM does the same).
        if not out.preempted:
            self._admit(budget, now, out)
        return out

    def _expire(self, now: float, out: SchedulerOutput) -> None:
        def expired(seq: Sequence) -> bool:
            return seq.deadline is not None and seq.deadline <= now

        late_waiting = [e[3] for e in self.waiting if expired(e[3])]
        if late_waiting:
            self._remove_waiting(late_waiting)
        late_running = [s for s in self.running if expired(s)]
        if late_running:
            self.running = [s for s in self.running if not expired(s)]
        for seq in late_waiting + late_running:
            seq.finish(FinishReason.TIMEOUT, now)
            self._release(seq)
            self.requests.pop(seq.request_id, None)
            self.num_timeouts += 1
            out.finished.append(seq)

    def _never_fits(self, seq: Sequence) -> bool:
        # A sequence that outgrew the context window or the whole KV pool would otherwise
        # preempt itself, be re-admitted and preempt itself again forever.
        bm = self.block_manager
        return len(seq) > self.config.max_model_len or bm.blocks_needed(len(seq)) > bm.num_blocks

    def _end(self, seq: Sequence, reason: str, now: float, out: SchedulerOutput) -> None:
        self.finish_seq(seq, reason, now)
        out.finished.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Send a running seq back to waiting; return the budget it had been given this step."""
        returned = 0
        for i, item in enumerate(out.scheduled):
            if item.seq is seq:
                returned = item.num_tokens
                del out.scheduled[i]
                break
        self.running = [s for s in self.running if s is not seq]
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Its original arrival_time keeps its place ahead of later arrivals.
        self._push_waiting(seq)
        out.preempted.append(seq)
        return returned

    def _admit(self, budget: int, now: float, out: SchedulerOutput) -> None:
        bm = self.block_manager
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0][3]
            if self._never_fits(seq):
                heapq.heappop(self.waiting)
                self._end(seq, FinishReason.LENGTH, now, out)
                continue
            if not seq.block_table:
                bm.allocate_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            # n == 0 is unreachable (add() refuses empty prompts and allocate_prefix leaves
            # the last token uncomputed) but must not admit a sequence with nothing to run.
            if n <= 0 or not bm.ensure_slots(seq, n):
                # Give back the prefix blocks so they stay evictable while it waits.
                bm.free(seq)
                break
            heapq.heappop(self.waiting)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

    def after_step(self, output: SchedulerOutput) -> None:
        """Record that the model computed the scheduled tokens and publish full blocks."""
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted or timed out while the step ran
            seq.num_computed_tokens += item.num_tokens
            assert seq.num_computed_tokens <= len(seq), "computed past the end of the sequence"
            self.block_manager.cache_full_blocks(seq)

    # ---- ending -----------------------------------------------------------------------------

    def finish_seq(self, seq: Sequence, reason: str, now: float | None = None) -> None:
        # Safe to call twice or on a seq the scheduler already ended (a timeout racing the
        # engine's stop check): the first reason wins, blocks are freed once.
        if not seq.is_finished:
            seq.finish(reason, now)
        self._release(seq)
        self.running = [s for s in self.running if s is not seq]
        if any(entry[3] is seq for entry in self.waiting):
            self._remove_waiting([seq])
        if self.requests.get(seq.request_id) is seq:
            del self.requests[seq.request_id]

    def _release(self, seq: Sequence) -> None:
        # free() zeroes num_cached_tokens (right for a preempted seq, whose K/V is gone), but a
        # finished request still reports how much of its prompt the prefix cache served.
        cached = seq.num_cached_tokens
        self.block_manager.free(seq)
        seq.num_cached_tokens = cached

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self.finish_seq(seq, FinishReason.ABORT)
        return seq
