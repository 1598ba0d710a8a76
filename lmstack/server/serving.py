"""Serving one OpenAI request on the engine: build its engine requests, stream or collect
their outputs (lmstack.server.generation), and render them as chat or text completions
(vLLM's serving_chat / serving_completion)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from lmstack.engine.outputs import RequestOutput, TokenLogprob
from lmstack.engine.sampling_params import StructuredOutput
from lmstack.errors import InputError
from lmstack.httpapi import DONE, SSEResponse, error_event, event
from lmstack.server import protocol as p
from lmstack.server.generation import Generation
from lmstack.server.limits import check_messages, check_prompt_tokens, check_request
from lmstack.server.state import RequestRecord, ServerState
from lmstack.server.tool_parser import ToolCallParser
from lmstack.server.tools import ToolPlan, plan_tools, render_messages

logger = logging.getLogger("lmstack.server")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


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


async def _compile_grammars(state: ServerState, constraints: list[StructuredOutput | None]):
    """Compile structured-output grammars on a worker thread; add_request then hits the cache.

    add_request would compile them on the event loop: a new schema, or the first one (~1 s
    to build the grammar tokenizer), would stall every stream meanwhile. The compiler is
    thread-safe and caches by schema. A grammar that does not compile is an InputError
    naming its request field (a 400) before anything enters the engine.
    """
    todo = [c for c in constraints if c is not None]
    if todo:
        await asyncio.to_thread(lambda: [state.engine.compile_grammar(c) for c in todo])


async def _respond(
    state: ServerState,
    request: Request,
    gen: Generation,
    stream: bool,
    events: Callable[[], AsyncIterator[str]],
    make_choice: Callable[[int, RequestOutput, list[TokenLogprob]], BaseModel],
    response_type: type[BaseModel],
) -> Response:
    """Stream `events()`, or collect every choice and answer with one response object."""
    if stream:
        return SSEResponse(events(), gen.close)
    try:
        result = await _unless_disconnected(request, gen.collect())
    finally:
        gen.close()
    if result is None:
        return Response(status_code=499)
    finals, choice_logprobs = result
    response = response_type(
        id=gen.request_id,
        created=gen.created,
        model=state.served_model_name,
        choices=[make_choice(i, final, choice_logprobs[i]) for i, final in enumerate(finals)],
        usage=gen.usage(),
    )
    return JSONResponse(response.model_dump(mode="json"))


# ---------------------------------------------------------------------------- chat


async def chat_response(
    state: ServerState, request: Request, body: p.ChatCompletionRequest, record: RequestRecord
) -> Response:
    limits = state.limits
    check_request(body, limits)
    if not body.messages:
        raise InputError("messages must hold at least one message")
    check_messages(body.messages, limits)
    constraint = body.constraint()
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, bool(constraint))
    tok = state.engine.tokenizer
    messages = render_messages(body.messages, plan)
    # Message text is encoded as text: only the template's own markup becomes control tokens.
    prompt_ids = tok.encode_chat(messages, body.add_generation_prompt)
    check_prompt_tokens(len(prompt_ids), body.n, limits)
    requested = body.requested_max_tokens()
    default = min(state.room(len(prompt_ids)), limits.max_output_tokens)
    max_tokens = default if requested is None else requested
    logprobs = body.engine_logprobs()
    if plan is not None:
        await _compile_grammars(state, plan.schema_constraints())  # names the bad tool
        constraint = plan.structured()
    await _compile_grammars(state, [constraint])
    params = [body.sampling_params(max_tokens, logprobs, i, constraint) for i in range(body.n)]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    prompts = [prompt_ids] * body.n
    gen = Generation(state, request_id, prompts, params, body, record, len(prompt_ids))

    def choice(i: int, final: RequestOutput, lps: list[TokenLogprob]) -> p.ChatChoice:
        content, calls = final.text, None
        if plan is not None:
            parser = ToolCallParser()
            parser.feed(final.text)
            parser.finish()
            content, made = parser.message()
            calls = [p.ToolCall.model_validate(call) for call in made] or None
        return p.ChatChoice(
            index=i,
            message=p.AssistantMessage(content=content, tool_calls=calls),
            logprobs=None if logprobs is None else state.renderer.chat(lps),
            finish_reason=_finish_reason(final.finish_reason, bool(calls)),
        )

    return await _respond(
        state,
        request,
        gen,
        body.stream,
        lambda: _chat_events(state, gen, body, plan),
        choice,
        p.ChatCompletionResponse,
    )


def _finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's "tool_calls" when a reply that ended by itself made calls."""
    return "tool_calls" if made_calls and reason == "stop" else reason


async def _chat_events(
    state: ServerState, gen: Generation, body: p.ChatCompletionRequest, plan: ToolPlan | None
) -> AsyncIterator[str]:
    def chunk(choices: list[p.ChatChunkChoice], usage: p.UsageInfo | None = None) -> str:
        return event(
            p.ChatCompletionChunk(
                id=gen.request_id,
                created=gen.created,
                model=state.served_model_name,
                choices=choices,
                usage=usage,
            )
        )

    # With tools, each choice's text goes through its parser: content, then call deltas.
    parsers = [ToolCallParser() for _ in range(body.n)] if plan is not None else None
    try:
        for i in range(body.n):
            yield chunk([p.ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
        async for i, out in gen.outputs():
            lp = state.renderer.chat(out.new_logprobs) if out.new_logprobs else None
            if parsers is None:
                deltas = [{"content": out.new_text}] if out.new_text or lp else []
            else:
                deltas = parsers[i].feed(out.new_text) if out.new_text else []
                if out.finished:
                    deltas += parsers[i].finish()
                if lp is not None and not deltas:
                    deltas = [{}]  # the tokens' logprobs still go out with their step
            for k, delta in enumerate(deltas):
                logprobs = lp if k == 0 else None
                yield chunk([p.ChatChunkChoice(index=i, delta=delta, logprobs=logprobs)])
            if out.finished:
                if out.finish_reason == "error":
                    yield error_event(f"generation failed: {out.error}")
                made_calls = parsers is not None and bool(parsers[i].calls)
                reason = _finish_reason(out.finish_reason, made_calls)
                yield chunk([p.ChatChunkChoice(index=i, delta={}, finish_reason=reason)])
        if body.include_usage:
            yield chunk([], usage=gen.usage())
    except Exception as exc:  # headers are sent: the error can only travel as an event
        logger.exception("stream failed")
        gen.record.error = f"{type(exc).__name__}: {exc}"
        yield error_event(gen.record.error)
    yield DONE


# ---------------------------------------------------------------------------- completions


async def completion_response(
    state: ServerState, request: Request, body: p.CompletionRequest, record: RequestRecord
) -> Response:
    limits = state.limits
    batch = body.prompts()
    check_request(body, limits, len(batch))
    tok = state.engine.tokenizer
    prompts = [tok.encode(x) if isinstance(x, str) else list(x) for x in batch]
    prompt_tokens = sum(map(len, prompts))
    check_prompt_tokens(prompt_tokens, body.n, limits)
    constraint = body.constraint()
    engine_prompts, params = [], []
    for ids in prompts:
        default = min(COMPLETION_DEFAULT_MAX_TOKENS, state.room(len(ids)), limits.max_output_tokens)
        max_tokens = default if body.max_tokens is None else body.max_tokens
        for _ in range(body.n):
            # Choice index over all prompts: prompt k's choices are k*n .. k*n + n-1.
            index = len(params)
            params.append(body.sampling_params(max_tokens, body.logprobs, index, constraint))
            engine_prompts.append(ids)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    await _compile_grammars(state, [constraint])
    gen = Generation(state, request_id, engine_prompts, params, body, record, prompt_tokens)

    def choice(i: int, final: RequestOutput, lps: list[TokenLogprob]) -> p.CompletionChoice:
        return p.CompletionChoice(
            index=i,
            text=final.text,
            logprobs=None if body.logprobs is None else state.renderer.completion(lps),
            finish_reason=final.finish_reason,
        )

    return await _respond(
        state,
        request,
        gen,
        body.stream,
        lambda: _completion_events(state, gen, body),
        choice,
        p.CompletionResponse,
    )


async def _completion_events(
    state: ServerState, gen: Generation, body: p.CompletionRequest
) -> AsyncIterator[str]:
    def chunk(choices: list[p.CompletionChoice], usage: p.UsageInfo | None = None) -> str:
        return event(
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
                    yield error_event(f"generation failed: {out.error}")
                yield chunk([p.CompletionChoice(index=i, text="", finish_reason=out.finish_reason)])
        if body.include_usage:
            yield chunk([], usage=gen.usage())
    except Exception as exc:  # headers are sent: the error can only travel as an event
        logger.exception("stream failed")
        gen.record.error = f"{type(exc).__name__}: {exc}"
        yield error_event(gen.record.error)
    yield DONE
