"""Batching embedding requests: one worker thread runs every forward pass of the embedder.

A request's texts go into a queue with an asyncio future; the worker takes the oldest job
and every further pending one while the batch stays within `max_batch_inputs` texts, runs
one `embed` call for all of them, and resolves each job's future with its rows. Requests
that arrive while a pass runs wait for the next, so 32 concurrent one-text requests cost
about one pass instead of 32, and the event loop never runs the model: it only awaits.

A job larger than `max_batch_inputs` runs alone (the embedder splits it into its own
batches). A failed pass fails the jobs in it, not the worker; a job whose caller went away
(its future cancelled) is dropped before the pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from lmstack.server.metrics import EmbeddingMetrics

logger = logging.getLogger("lmstack.server")

# The embedder's own batch size: one pass of up to this many texts is one forward call.
DEFAULT_MAX_BATCH_INPUTS = 64


@dataclass
class _Job:
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(future: asyncio.Future, rows: np.ndarray | None, error: BaseException | None):
    if future.done():  # cancelled: the request is gone
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(rows)


class EmbeddingBatcher:
    """`await batcher.embed(texts)` -> [len(texts), dimension] float32 unit vectors."""

    def __init__(
        self,
        embedder,
        metrics: EmbeddingMetrics | None = None,
        max_batch_inputs: int = DEFAULT_MAX_BATCH_INPUTS,
    ) -> None:
        if max_batch_inputs < 1:
            raise ValueError(f"max_batch_inputs must be >= 1, got {max_batch_inputs}")
        self.embedder = embedder
        self.metrics = metrics
        self.max_batch_inputs = max_batch_inputs
        self._jobs: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def embed(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), loop, loop.create_future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the embedding worker is shut down")
            if self._thread is None:  # started on first use: apps that never embed pay nothing
                self._thread = threading.Thread(target=self._run, name="lmstack-embed", daemon=True)
                self._thread.start()
            self._jobs.append(job)
            self._wake.notify()
        return await job.future

    def close(self) -> None:
        """Stop the worker once the jobs already queued are done."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------ worker thread

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job, then whole jobs while they fit; None to stop."""
        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            if not self._jobs:
                return None
            batch = [self._jobs.popleft()]
            size = len(batch[0].texts)
            while self._jobs and size + len(self._jobs[0].texts) <= self.max_batch_inputs:
                job = self._jobs.popleft()
                batch.append(job)
                size += len(job.texts)
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            batch = [job for job in batch if not job.future.cancelled()]
            if batch:
                self._pass(batch)

    def _pass(self, batch: list[_Job]) -> None:
        texts = [text for job in batch for text in job.texts]
        rows: np.ndarray | None = None
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            rows = self.embedder.embed(texts)
        except Exception as exc:  # this batch fails; the worker carries on
            logger.exception("embedding pass failed")
            error = RuntimeError(f"embedding failed: {type(exc).__name__}: {exc}")
        if self.metrics is not None:
            self.metrics.batches.inc()
            self.metrics.batch_inputs.observe(len(texts))
        logger.debug(
            '{"event": "embedding_pass", "jobs": %d, "inputs": %d, "seconds": %.4f}',
            len(batch),
            len(texts),
            time.perf_counter() - started,
        )
        offset = 0
        for job in batch:
            part = None if rows is None else rows[offset : offset + len(job.texts)]
            offset += len(job.texts)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                job.loop.call_soon_threadsafe(_resolve, job.future, part, error)
