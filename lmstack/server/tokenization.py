"""`POST /tokenize`, `POST /detokenize` and `GET /version`, in vLLM's shapes.

/tokenize takes a text (`prompt`, with `add_special_tokens`, default true) or a chat
(`messages`, rendered with the model's chat template exactly as /v1/chat/completions renders
it, with `add_generation_prompt`, default true) and answers {count, max_model_len, tokens,
token_strs}; /detokenize turns {tokens} back into {prompt}. Both use the served model's
tokenizer, through the engine; tokenizing runs on a worker thread, since a body may hold a
megabyte of text. Bad token ids are a 400 naming the value, and vLLM fields lmstack does
not implement (`continue_final_message`) are refused, not ignored.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from pydantic import StrictInt

from lmstack.httpapi import APIError, parse_body
from lmstack.server import protocol as p
from lmstack.server.limits import check_messages
from lmstack.server.state import ServerState
from lmstack.version import __version__


class TokenizeRequest(p.RequestModel):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one: `prompt` or
    `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[p.ChatMessage] | None = None
    # Default: true for a prompt, false for messages (the template writes the markup), as vLLM.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(p.RequestModel):
    model: str | None = None
    tokens: list[StrictInt]


def tokenize(state: ServerState, body: TokenizeRequest) -> dict:
    tok = state.engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        given = "both" if body.prompt is not None else "neither"
        raise APIError(400, f"give `prompt` (a text) or `messages` (a chat), got {given}")
    if body.prompt is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tok.encode(body.prompt, add_special_tokens=add)
    else:
        if body.continue_final_message:
            raise APIError(
                400,
                "continue_final_message is not supported: lmstack renders a chat with or "
                "without the generation prompt (add_generation_prompt)",
                param="continue_final_message",
            )
        if not body.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        check_messages(body.messages, state.limits)
        messages = [m.as_template_message(i) for i, m in enumerate(body.messages)]
        ids = tok.encode_chat(messages, body.add_generation_prompt)
        if body.add_special_tokens:
            # What the tokenizer adds around a text (a BOS, for Llama-style tokenizers), on
            # top of the template's own markup; the bundled tokenizer adds nothing.
            prefix = tok.encode("", add_special_tokens=True)
            if prefix and ids[: len(prefix)] != prefix:
                ids = prefix + ids
    strs = [tok.id_to_token(t) for t in ids] if body.return_token_strs else None
    return {
        "count": len(ids),
        "max_model_len": state.engine.max_model_len,
        "tokens": ids,
        "token_strs": strs,
    }


def detokenize(state: ServerState, body: DetokenizeRequest) -> dict:
    tok = state.engine.tokenizer
    vocab = tok.vocab_size
    for i, token in enumerate(body.tokens):
        if not 0 <= token < vocab:
            raise APIError(
                400,
                f"tokens[{i}] is {token}: token ids of this model are in [0, {vocab})",
                param=f"tokens[{i}]",
            )
    # Special tokens are kept, as vLLM does: /tokenize of a chat round-trips to its markup.
    return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}


def add_tokenize_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        body = await parse_body(request, TokenizeRequest)
        state.check_model(body.model)
        return await asyncio.to_thread(tokenize, state, body)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        body = await parse_body(request, DetokenizeRequest)
        state.check_model(body.model)
        return await asyncio.to_thread(detokenize, state, body)

    @app.get("/version")
    async def version():
        return {"version": __version__}
