"""AsyncLLMEngine: the step loop in a background thread, results streamed to asyncio.

Callers (the HTTP server) run on an asyncio loop; the engine's step is synchronous torch
work. One thread owns the engine and is the only one that touches its scheduler. Callers
never wait for a step: a new request is validated and tokenized (and its grammar compiled)
on the caller's side, then dropped in an inbox; aborts go to an inbox too; the step thread
drains both before each step. Outputs come back through each request's asyncio.Queue, and
stats are a snapshot the step thread publishes after every step.

The step thread also loads the model when it builds its own engine. With torch's OpenMP
backend each thread that runs parallel ops gets its own team of worker threads, and once
the teams together outnumber the cores, libgomp stops letting idle workers spin and puts
them to sleep after every parallel region. A model loaded on the caller's thread and
stepped on this one did exactly that: every op then paid a futex wake-up, and decode steps
took 1.5-1.7x as long as the same steps on one thread (79-91 ms against 50-57 ms for 20
sequences, measured here). `exclusive_threads=True` (the server) goes one further: other
threads of the process then run torch ops single-threaded, so a web request that embeds
a query or draws an attention map cannot form a second team behind the engine's back.

Failures. Work that belongs to one request (its grammar mask, sampling, stop checks,
detokenizing, even its share of the batched forward: see LLMEngine.step) fails that request
alone. A step that raises anyway fails every request in flight and the loop goes on; after
MAX_FAILED_STEPS such steps in a row the engine is broken, not unlucky, and the thread stops.
When the thread stops for any reason (that, an exception outside a step, shutdown), every
request still in flight ends with finish_reason "error", `is_alive` turns False (/ready and
/health answer 503) and `add_request` raises EngineDeadError at once (HTTP 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator

import torch

from lmstack.engine.config import EngineConfig
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.outputs import RequestOutput
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import QueueFullError
from lmstack.engine.sequence import FinishReason, Sequence
from lmstack.errors import EngineDeadError

logger = logging.getLogger("lmstack.engine")

# Steps in a row that raise (each failing every request in flight) before the engine is
# declared dead. One is bad luck; three with fresh requests each time is a broken engine.
MAX_FAILED_STEPS = 3


class AsyncLLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        engine: LLMEngine | None = None,
        *,
        exclusive_threads: bool = False,
        **overrides,
    ):
        self.engine = engine
        self._inbox_lock = threading.Lock()
        self._new: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._stats: dict = {}
        # Admission control without waiting for the step thread: the waiting count is the
        # last snapshot's plus every request submitted after the drain that snapshot saw.
        self._submitted = 0
        self._drained = 0
        self._snapshot_drained = 0
        self.num_rejected = 0
        self.step_error: str | None = None
        self.failed_steps = 0  # consecutive steps that raised
        self.dead: str | None = None  # why the step thread stopped; None while it runs
        ready = threading.Event()
        self._load_error: BaseException | None = None
        self.step_threads = 0  # torch threads the step thread runs with
        self._thread = threading.Thread(
            target=self._run,
            args=(config, overrides, torch.get_num_threads(), ready),
            name="lmstack-engine",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        if exclusive_threads:
            # The step thread has fixed its own thread count; from here on torch's default
            # (what every other thread starts with) is one thread.
            torch.set_num_threads(1)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def precision(self) -> dict:
        return self.engine.precision

    # What a server or an app needs of the engine, so none reaches into `.engine`.

    @property
    def model_name(self) -> str:
        """The model as configured: 'bundled', a .gguf file or an HF directory."""
        return str(self.engine.config.model or "bundled")

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) one request can hold: window and KV pool."""
        return self.engine.max_request_tokens

    def compile_grammar(self, structured) -> None:
        """Compile (and cache) a structured-output grammar, raising InputError for a bad
        one; slow for large schemas, so servers call it in a worker thread."""
        self.engine.grammar.compile(structured)

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    # ------------------------------------------------------------ step thread

    def _run(self, config, overrides: dict, threads: int, ready: threading.Event) -> None:
        try:
            torch.set_num_threads(threads)
            self.step_threads = torch.get_num_threads()
            if self.engine is None:
                self.engine = LLMEngine(config, **overrides)
            self._stats = self.engine.stats()
        except BaseException as exc:  # a bad --model: raised again in the constructor
            self._load_error = exc
            return
        finally:
            ready.set()
        reason = "the engine was shut down"
        try:
            self._loop()
        except BaseException as exc:  # whatever it was, the thread is over
            logger.error("the engine's step thread stopped", exc_info=exc)
            reason = f"the engine's step thread stopped ({type(exc).__name__}: {exc})"
        self._die(f"{reason}; this server cannot generate until it is restarted")

    def _loop(self) -> None:
        while not self._stopping:
            outputs = self._drain_inbox()
            if self.engine.has_unfinished_requests():
                try:
                    outputs += self.engine.step()
                    if not self.engine.lone_failure:
                        self.failed_steps = 0
                except Exception as exc:  # fail the in-flight requests, keep serving
                    self.step_error = f"{type(exc).__name__}: {exc}"
                    self.failed_steps += 1
                    if self.failed_steps >= MAX_FAILED_STEPS:
                        raise RuntimeError(
                            f"{self.failed_steps} steps in a row failed, the last with "
                            f"{self.step_error}"
                        ) from exc
                    outputs += self._fail_all(self.step_error)
                self._publish_stats()
                self._deliver(outputs)
                continue
            self._publish_stats()
            self._deliver(outputs)
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._inbox_lock:
            new, self._new = list(self._new), deque()
            aborts, self._aborts = list(self._aborts), deque()
            self._drained = self._submitted
        refused = []
        for seq in new:
            try:
                self.engine.add_sequence(seq)
            except QueueFullError as exc:  # lost a race with other producers
                seq.error = str(exc)
                seq.finish(FinishReason.ABORT)
                refused.append(self.engine.output(seq))
        for request_id in aborts:
            self.engine.abort(request_id)
        return refused

    def _publish_stats(self) -> None:
        stats = self.engine.stats()
        stats["num_rejected"] = stats.get("num_rejected", 0) + self.num_rejected
        with self._inbox_lock:
            self._stats = stats
            self._snapshot_drained = self._drained

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One wake-up per event loop per step (not one per request): each call_soon_threadsafe
        # writes to the loop's self-pipe and wakes it.
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._queues.get(out.request_id)
            if target is not None:
                loop, queue = target
                batches.setdefault(loop, []).append((queue, out))
            if out.finished:
                self._queues.pop(out.request_id, None)
        for loop, items in batches.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                loop.call_soon_threadsafe(_put_all, items)

    def _die(self, message: str) -> None:
        """The thread is ending: refuse new requests, end the ones in flight with `message`."""
        with self._inbox_lock:
            self.dead = message
            pending, self._queues = self._queues, {}
            self._new.clear()
        outputs = [
            RequestOutput(request_id, 0, [], "", "", [], True, "error", error=message)
            for request_id in pending
        ]
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            loop, queue = pending[out.request_id]
            batches.setdefault(loop, []).append((queue, out))
        for loop, items in batches.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        """A step raised: end every in-flight request with the error instead of hanging."""
        outputs = []
        for request_id in list(self._queues):
            self.engine.abort(request_id)
            outputs.append(
                RequestOutput(request_id, 0, [], "", "", [], True, "error", error=message)
            )
        self.engine.step_aborted_cleanup()
        return outputs

    # ------------------------------------------------------------ caller side

    def add_request(
        self,
        prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tuple[str, asyncio.Queue]:
        """Queue a request from a coroutine; returns its id and the queue of its outputs.

        Raises InputError for bad input, QueueFullError when the waiting queue is full and
        EngineDeadError when the step thread has stopped, synchronously, so a server can
        answer 400/429/503 before it starts a stream.
        """
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        loop = asyncio.get_running_loop()
        seq = self.engine.make_sequence(prompt, params, priority, timeout, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        bound = self.engine.scheduler.config.max_waiting
        with self._inbox_lock:
            if self.dead is not None:  # died while this request was being validated
                raise EngineDeadError(self.dead)
            if self._waiting_estimate() >= bound:
                self.num_rejected += 1
                raise QueueFullError(bound)
            self._queues[seq.request_id] = (loop, queue)
            self._new.append(seq)
            self._submitted += 1
        self._wake.set()
        return seq.request_id, queue

    async def stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Outputs of an added request; closing the iterator early aborts the request."""
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(
        self,
        prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        request_id, queue = self.add_request(prompt, params, priority, timeout, request_id)
        async for out in self.stream(request_id, queue):
            yield out

    def abort(self, request_id: str) -> bool:
        """Abort a request; True when it was still in flight."""
        with self._inbox_lock:
            known = self._queues.pop(request_id, None) is not None
            self._aborts.append(request_id)
        self._wake.set()
        return known

    def _waiting_estimate(self) -> int:
        # Called under _inbox_lock. Upper bound: some submitted requests may already run.
        return self._stats["num_waiting"] + self._submitted - self._snapshot_drained

    def stats(self) -> dict:
        """The latest snapshot (never waits for a step)."""
        with self._inbox_lock:
            stats = dict(self._stats)
            stats["num_waiting"] = self._waiting_estimate()
        return stats

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)


def _put_all(items: list) -> None:
    for queue, out in items:
        queue.put_nowait(out)
