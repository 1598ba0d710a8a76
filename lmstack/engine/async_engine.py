"""AsyncLLMEngine: the step loop in a background thread, results streamed to asyncio.

Callers (the HTTP server) run on an asyncio loop; the engine's step is synchronous torch
work. One thread owns the engine and steps while there is work; requests and aborts cross
over under a lock, outputs come back through each request's asyncio.Queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from lmstack.engine.config import EngineConfig
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.outputs import RequestOutput
from lmstack.engine.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(
        self, config: EngineConfig | None = None, engine: LLMEngine | None = None, **overrides
    ):
        self.engine = engine or LLMEngine(config, **overrides)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self.step_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="lmstack-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except Exception as exc:  # fail the in-flight requests, keep serving
                        self.step_error = f"{type(exc).__name__}: {exc}"
                        outputs = self._fail_all(self.step_error)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for out in outputs:
                target = self._queues.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)
                if out.finished:
                    self._queues.pop(out.request_id, None)

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

    def add_request(
        self,
        prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tuple[str, asyncio.Queue]:
        """Queue a request from a coroutine; returns its id and the queue of its outputs."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            request_id = self.engine.add_request(prompt, params, priority, timeout, request_id)
            self._queues[request_id] = (loop, queue)
        self._wake.set()
        return request_id, queue

    async def generate(
        self,
        prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request."""
        request_id, queue = self.add_request(prompt, params, priority, timeout, request_id)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._queues.pop(request_id, None)
            aborted = self.engine.abort(request_id)
        self._wake.set()
        return aborted

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
