"""The engine requests behind one HTTP request (n choices, several prompts), merged into one
stream of outputs; closing it aborts whatever has not finished, so no work outlives its
client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from lmstack.engine.outputs import RequestOutput, TokenLogprob
from lmstack.engine.sampling_params import SamplingParams
from lmstack.httpapi import APIError
from lmstack.server import protocol as p
from lmstack.server.metrics import queue_time
from lmstack.server.state import RequestRecord, ServerState


class Generation:
    """The engine requests behind one HTTP request, merged into one stream of outputs."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        options: p.SamplingRequest,
        record: RequestRecord,
        prompt_tokens: int,
    ) -> None:
        self.state, self.request_id, self.record = state, request_id, record
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.finals: list[RequestOutput | None] = [None] * len(prompts)
        self.handles: list[tuple[str, asyncio.Queue]] = []
        self._last_token_at: list[float | None] = [None] * len(prompts)
        self._closed = False
        record.id, record.prompt_tokens = request_id, prompt_tokens
        try:
            for i, (ids, sp) in enumerate(zip(prompts, params)):
                handle = state.engine.add_request(
                    ids, sp, options.priority, options.timeout, f"{request_id}-{i}"
                )
                self.handles.append(handle)
        except BaseException:
            # All choices or none: a later one refused (queue full, bad input) undoes the rest.
            for request, _ in self.handles:
                state.engine.abort(request)
            self._closed = True
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, until every choice finished."""
        try:
            if len(self.handles) == 1:
                # One choice (nearly every request): await its queue directly; a task and an
                # asyncio.wait per token were most of the event loop's work per streamed token.
                queue = self.handles[0][1]
                finished = False
                while not finished:
                    out = await queue.get()
                    self._observe(0, out)
                    finished = out.finished
                    yield 0, out
                return
            async for item in self._merged():
                yield item
        finally:
            self.close()

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        pending = {asyncio.ensure_future(q.get()): i for i, (_, q) in enumerate(self.handles)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in sorted(done, key=pending.__getitem__):
                    i = pending.pop(future)
                    out = future.result()
                    self._observe(i, out)
                    if not out.finished:
                        pending[asyncio.ensure_future(self.handles[i][1].get())] = i
                    yield i, out
        finally:
            for future in pending:
                future.cancel()

    async def collect(self) -> tuple[list[RequestOutput], list[list[TokenLogprob]]]:
        logprobs: list[list[TokenLogprob]] = [[] for _ in self.handles]
        async for i, out in self.outputs():
            logprobs[i].extend(out.new_logprobs or ())
        failed = [f.error for f in self.finals if f is not None and f.finish_reason == "error"]
        if failed and not self.state.engine.is_alive:  # the step thread died under it
            raise APIError(503, failed[0], "server_error", code="engine_dead")
        if failed:
            raise APIError(500, f"generation failed: {failed[0]}", "server_error")
        return self.finals, logprobs  # type: ignore[return-value]

    def usage(self) -> p.UsageInfo:
        completion = sum(len(f.token_ids) for f in self.finals if f is not None)
        return p.UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def close(self) -> None:
        """Abort what has not finished (idempotent) and complete the log record."""
        if self._closed:
            return
        self._closed = True
        for i, (request, _) in enumerate(self.handles):
            if self.finals[i] is None:
                self.state.engine.abort(request)
                self.state.metrics.observe_abort()
        finals = [f for f in self.finals if f is not None]
        record = self.record
        record.output_tokens = sum(len(f.token_ids) for f in finals)
        ttfts = [f.ttft for f in finals if f.ttft is not None]
        queued = [t for t in map(queue_time, finals) if t is not None]
        record.ttft_s = round(min(ttfts), 4) if ttfts else None
        record.queue_time_s = round(min(queued), 4) if queued else None
        reasons = sorted({f.finish_reason or "unknown" for f in finals})
        if len(finals) < len(self.handles):
            reasons.append("abort")
        record.finish_reason = ",".join(reasons)
        record.error = record.error or next((f.error for f in finals if f.error), None)

    def _observe(self, i: int, out: RequestOutput) -> None:
        metrics = self.state.metrics
        if out.new_token_ids:
            now = time.monotonic()
            last = self._last_token_at[i]
            if last is not None:
                metrics.inter_token.observe((now - last) / len(out.new_token_ids))
            self._last_token_at[i] = now
        if out.finished:
            self.finals[i] = out
            metrics.observe_finished(out)
