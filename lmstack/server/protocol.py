"""OpenAI-compatible request and response models, and the engine-to-OpenAI conversions.

Requests mirror the OpenAI spec (plus vLLM-style extensions: priority, timeout, top_k, min_p,
repetition_penalty, ignore_eos, structured_outputs). A field lmstack does not implement is
refused with a 400 naming it (lmstack.server.fields; `--lenient` ignores such fields
instead); harmless metadata OpenAI clients send (`user`, `metadata`, `store`,
`safety_identifier`) is accepted and ignored. Pydantic checks types here, and that every
number is finite (JSON's 1e999 parses as inf); the server's bounds on a request's work are
in lmstack.server.limits, range checks in SamplingParams.validate and the engine, all
naming the value and the limit. Tool calling's fields and prompt format are in
lmstack.server.tools, the decoding constraints in lmstack.server.constraints.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer

from lmstack.engine.outputs import TokenLogprob
from lmstack.engine.sampling_params import SamplingParams, StructuredOutput
from lmstack.errors import InputError
from lmstack.server.constraints import (
    JsonSchemaSpec,
    ResponseFormat,
    StructuredOutputs,
    parse_logit_bias,
    request_constraint,
)
from lmstack.server.fields import OpenAIModel, RequestModel
from lmstack.server.tools import MessageToolCall, NamedToolChoice, Tool

__all__ = ["JsonSchemaSpec", "OpenAIModel", "RequestModel", "ResponseFormat"]

# torch.Generator.manual_seed takes a 64-bit value; beyond it the engine's step would raise
# and fail every request in the batch, so the range is checked here.
SEED_RANGE = (-(2**63), 2**64 - 1)


# ---------------------------------------------------------------------------- requests


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    # Metadata OpenAI clients send; nothing here depends on it.
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # lmstack stores no completions either way
    # Extensions (vLLM names where vLLM has them).
    structured_outputs: StructuredOutputs | None = None
    priority: int = 0
    timeout: float | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def check_seed(self, num_choices: int) -> None:
        """The seeds of all choices (seed .. seed + num_choices - 1) fit 64 bits."""
        low, high = SEED_RANGE[0], SEED_RANGE[1] - (num_choices - 1)
        if self.seed is not None and not low <= self.seed <= high:
            raise InputError(f"seed must be in [{low}, {high}], got {self.seed}")

    def constraint(self) -> StructuredOutput | None:
        """response_format or structured_outputs (both: a 400), as one engine constraint."""
        return request_constraint(self.response_format, self.structured_outputs)

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        index: int = 0,
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        """Params for choice `index`: with a seed, choice i gets seed + i so choices differ.
        `structured`: the request's constraint (constraint(), or its tool-call grammar)."""
        stop = self.stop_list()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=None if self.seed is None else self.seed + index,
            stop=stop or None,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            structured=structured,
            logit_bias=parse_logit_bias(self.logit_bias),
        )


class TextPart(RequestModel):
    # Other part types (image_url, ...) carry other keys: refused by type, with a clearer
    # message than "unsupported field", in as_template_message.
    model_config = {"extra": "ignore"}

    type: str
    text: str | None = None


class ChatMessage(RequestModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers

    def as_template_message(self, index: int) -> dict:
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise InputError(f"messages[{index}]: only text content parts are supported")
            content = "".join(part.text for part in content)
        # OpenAI's newer "developer" role plays the part of "system" in chat templates.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def engine_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InputError("top_logprobs requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a string, token ids, or a list of either."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise InputError("prompt is empty")
        return list(prompt)


# ---------------------------------------------------------------------------- responses


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmstack"
    root: str | None = None
    max_model_len: int | None = None
    dtype: str | None = None  # the weights' precision, "auto" resolved
    dtype_reason: str | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None  # null beside tool calls, as OpenAI sends it
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_only_when_made(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(OpenAIModel):
    index: int
    # {"role": ...} first, then {"content": ...} or {"tool_calls": [...]}, {} with
    # finish_reason.
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(OpenAIModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIModel):
    """Also the shape of each streamed chunk, as in OpenAI's API."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------- logprobs


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: each visible character stands for a byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    visible += range(ord("®"), ord("ÿ") + 1)
    chars = list(visible)
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars)}


_BYTE_DECODER = _byte_decoder()


class TokenRenderer:
    """A token id as OpenAI shows it in logprobs: its text and its exact bytes.

    A byte-level BPE token may hold part of a UTF-8 character; its `bytes` are still exact
    (read from the vocabulary), while its text shows U+FFFD, as OpenAI's API does.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        probe = tokenizer.encode(" a")
        piece = tokenizer.id_to_token(probe[0]) if probe else None
        self.byte_level = bool(piece) and piece.startswith("Ġ")
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def render(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._bytes(token_id)
            cached = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = cached
        return cached

    def _bytes(self, token_id: int) -> bytes:
        tok = self.tokenizer
        piece = tok.id_to_token(token_id) or ""
        special = token_id in getattr(tok, "special_token_ids", ())
        if self.byte_level and not special and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        return tok.decode([token_id], skip_special_tokens=False).encode()

    def chat(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in logprobs:
            text, raw = self.render(lp.token_id)
            top = [TopLogprob(token=t, logprob=v, bytes=b) for t, b, v in self._top(lp)]
            content.append(
                ChatTokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=top)
            )
        return ChatLogprobs(content=content)

    def completion(self, logprobs: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        """`offset`: characters of completion text before these tokens (for text_offset)."""
        out = CompletionLogprobs()
        for lp in logprobs:
            text, _ = self.render(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({t: v for t, _, v in self._top(lp)})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def _top(self, lp: TokenLogprob) -> list[tuple[str, list[int], float]]:
        return [(*self.render(tid), value) for tid, value in lp.top]
