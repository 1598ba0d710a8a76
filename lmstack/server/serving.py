"""Serving one OpenAI request on the engine: admit its engine requests, stream or collect
their outputs, and render them as chat or text completions (vLLM's serving_chat/_completion).

A request with n choices (or several prompts) is several engine requests merged into one
stream. Whatever ends the HTTP request early, a client that disconnects, an error, a
shutdown, aborts the engine requests still running, so no work outlives its client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from lmstack.engine.async_engine import AsyncLLMEngine
from lmstack.engine.outputs import RequestOutput, TokenLogprob
from lmstack.engine.sampling_params import SamplingParams
from lmstack.errors import InputError
from lmstack.server import protocol as p
from lmstack.server.metrics import ServerMetrics, queue_time

logger = logging.getLogger("lmstack.server")

DONE = "data: [DONE]\n\n"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


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
    created: int = field(default_factory=lambda: int(time.time()))

    def room(self, prompt_tokens: int) -> int:
        """Output tokens left for a prompt; at least 1 so the engine names the real limit."""
        return max(1, self.max_request_tokens - prompt_tokens)


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
            self.close()

    async def collect(self) -> tuple[list[RequestOutput], list[list[TokenLogprob]]]:
        logprobs: list[list[TokenLogprob]] = [[] for _ in self.handles]
        async for i, out in self.outputs():
            logprobs[i].extend(out.new_logprobs or ())
        failed = [f.error for f in self.finals if f is not None and f.finish_reason == "error"]
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


class SSEResponse(StreamingResponse):
    """text/event-stream that always runs `on_close`, however the stream ends.

    Starlette cancels the stream when the client disconnects; closing the event generator
    and the Generation here also covers a stream that never started.
    """

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close()


def _event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _error_event(message: str, kind: str = "server_error") -> str:
    error = p.ErrorInfo(message=message, type=kind)
    return f"data: {p.ErrorResponse(error=error).model_dump_json()}\n\n"


async def _unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it (which aborts its engine requests) if the client leaves."""

    async def disconnected() -> None:
        # The body is already read: the next message is the disconnect, whenever it comes.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        return None
    return task.result()


async def _compile_grammar(state: ServerState, params: SamplingParams) -> None:
    """Compile a structured-output grammar on a worker thread; add_request then hits the cache.

    add_request would compile it on the event loop, under the engine lock: a new schema, or
    the first one (~1 s to build the grammar tokenizer), would stall every stream and the
    step loop meanwhile. The compiler is thread-safe and caches by schema.
    """
    if params.structured is not None:
        await asyncio.to_thread(state.engine.engine.grammar.compile, params.structured)


# ---------------------------------------------------------------------------- chat


async def chat_response(
    state: ServerState, request: Request, body: p.ChatCompletionRequest, record: RequestRecord
) -> Response:
    body.check_counts()
    if not body.messages:
        raise InputError("messages must hold at least one message")
    tok = state.engine.tokenizer
    messages = [m.as_template_message(i) for i, m in enumerate(body.messages)]
    prompt_ids = tok.encode(tok.apply_chat_template(messages, body.add_generation_prompt))
    requested = body.requested_max_tokens()
    max_tokens = state.room(len(prompt_ids)) if requested is None else requested
    logprobs = body.engine_logprobs()
    params = [body.sampling_params(max_tokens, logprobs, i) for i in range(body.n)]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    prompts = [prompt_ids] * body.n
    await _compile_grammar(state, params[0])
    gen = Generation(state, request_id, prompts, params, body, record, len(prompt_ids))
    if body.stream:
        return SSEResponse(_chat_events(state, gen, body), gen.close)
    try:
        result = await _unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    if result is None:
        return Response(status_code=499)
    finals, choice_logprobs = result
    choices = [
        p.ChatChoice(
            index=i,
            message=p.AssistantMessage(content=final.text),
            logprobs=None if logprobs is None else state.renderer.chat(choice_logprobs[i]),
            finish_reason=final.finish_reason,
        )
        for i, final in enumerate(finals)
    ]
    response = p.ChatCompletionResponse(
        id=request_id,
        created=gen.created,
        model=state.served_model_name,
        choices=choices,
        usage=gen.usage(),
    )
    return JSONResponse(response.model_dump(mode="json"))


async def _chat_events(
    state: ServerState, gen: Generation, body: p.ChatCompletionRequest
) -> AsyncIterator[str]:
    def chunk(choices: list[p.ChatChunkChoice], usage: p.UsageInfo | None = None) -> str:
        return _event(
            p.ChatCompletionChunk(
                id=gen.request_id,
                created=gen.created,
                model=state.served_model_name,
                choices=choices,
                usage=usage,
            )
        )

    try:
        for i in range(body.n):
            yield chunk([p.ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
        async for i, out in gen.outputs():
            if out.new_text or out.new_logprobs:
                lp = state.renderer.chat(out.new_logprobs) if out.new_logprobs else None
                delta = {"content": out.new_text}
                yield chunk([p.ChatChunkChoice(index=i, delta=delta, logprobs=lp)])
            if out.finished:
                if out.finish_reason == "error":
                    yield _error_event(f"generation failed: {out.error}")
                yield chunk([p.ChatChunkChoice(index=i, delta={}, finish_reason=out.finish_reason)])
        if body.include_usage:
            yield chunk([], usage=gen.usage())
    except Exception as exc:  # headers are sent: the error can only travel as an event
        logger.exception("stream failed")
        gen.record.error = f"{type(exc).__name__}: {exc}"
        yield _error_event(gen.record.error)
    yield DONE


# ---------------------------------------------------------------------------- completions


async def completion_response(
    state: ServerState, request: Request, body: p.CompletionRequest, record: RequestRecord
) -> Response:
    tok = state.engine.tokenizer
    prompts = [tok.encode(x) if isinstance(x, str) else list(x) for x in body.prompts()]
    body.check_counts(len(prompts))
    engine_prompts, params = [], []
    for ids in prompts:
        default = min(COMPLETION_DEFAULT_MAX_TOKENS, state.room(len(ids)))
        max_tokens = default if body.max_tokens is None else body.max_tokens
        for _ in range(body.n):
            # Choice index over all prompts: prompt k's choices are k*n .. k*n + n-1.
            params.append(body.sampling_params(max_tokens, body.logprobs, len(params)))
            engine_prompts.append(ids)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompt_tokens = sum(map(len, prompts))
    await _compile_grammar(state, params[0])
    gen = Generation(state, request_id, engine_prompts, params, body, record, prompt_tokens)
    if body.stream:
        return SSEResponse(_completion_events(state, gen, body), gen.close)
    try:
        result = await _unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    if result is None:
        return Response(status_code=499)
    finals, choice_logprobs = result
    choices = [
        p.CompletionChoice(
            index=i,
            text=final.text,
            logprobs=None
            if body.logprobs is None
            else state.renderer.completion(choice_logprobs[i]),
            finish_reason=final.finish_reason,
        )
        for i, final in enumerate(finals)
    ]
    response = p.CompletionResponse(
        id=request_id,
        created=gen.created,
        model=state.served_model_name,
        choices=choices,
        usage=gen.usage(),
    )
    return JSONResponse(response.model_dump(mode="json"))


async def _completion_events(
    state: ServerState, gen: Generation, body: p.CompletionRequest
) -> AsyncIterator[str]:
    def chunk(choices: list[p.CompletionChoice], usage: p.UsageInfo | None = None) -> str:
        return _event(
            p.CompletionResponse(
                id=gen.request_id,
                created=gen.created,
                model=state.served_model_name,
                choices=choices,
                usage=usage,
            )
        )

    offsets = [0] * len(gen.handles)  # characters of text so far, per choice (text_offset)
    try:
        async for i, out in gen.outputs():
            if out.new_text or out.new_logprobs:
                lp = None
                if out.new_logprobs:
                    lp = state.renderer.completion(out.new_logprobs, offsets[i])
                    offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
                yield chunk([p.CompletionChoice(index=i, text=out.new_text, logprobs=lp)])
            if out.finished:
                if out.finish_reason == "error":
                    yield _error_event(f"generation failed: {out.error}")
                yield chunk([p.CompletionChoice(index=i, text="", finish_reason=out.finish_reason)])
        if body.include_usage:
            yield chunk([], usage=gen.usage())
    except Exception as exc:  # headers are sent: the error can only travel as an event
        logger.exception("stream failed")
        gen.record.error = f"{type(exc).__name__}: {exc}"
        yield _error_event(gen.record.error)
    yield DONE
