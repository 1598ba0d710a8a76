"""Bounds on the work one request may ask for, checked before anything is built for it.

Each field is a `lmstack serve` flag of the same name (`max_n` is `--max-n`), and every
refusal is a 400 naming the value given, the limit and that flag. The body size itself is
bounded earlier, by --max-body-bytes (a 413 before the body is read).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from lmstack.engine.sampling_params import SamplingParams
from lmstack.errors import InputError
from lmstack.httpapi import json_nesting

# The default total of prompt tokens x n is this many full-size requests: enough for n
# choices of a long prompt (prefix caching shares their prompt blocks), small enough that
# one request cannot make the server prefill millions of tokens.
PROMPT_TOKENS_PER_REQUEST_FACTOR = 8


def flag(name: str) -> str:
    """The `lmstack serve` option that sets the limit `name`."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class RequestLimits:
    # Choices per request (OpenAI's `n`); each is a full engine request.
    max_n: int = 64
    # Engine requests per request: prompts x n (a /v1/completions prompt may be a batch).
    max_request_choices: int = 256
    # Prompt tokens x n, summed over the request's prompts. None: 8 x the largest request
    # the engine holds (the context window, or the KV pool if smaller).
    max_request_prompt_tokens: int | None = None
    # max_tokens / max_completion_tokens. None: the largest request the engine holds.
    max_output_tokens: int | None = None
    # OpenAI allows 4 stop strings; 16 of 256 characters keeps the per-token stop scan (the
    # text tail against every string) and the held-back tail small, and covers every
    # client seen sending more than 4 (tool-call and chat-template markers).
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    # top_logprobs (chat) and logprobs (completions): OpenAI's 20, also the engine's ceiling.
    max_logprobs: int = SamplingParams.MAX_LOGPROBS
    # priority (lower is served first) must be in [-max_abs_priority, max_abs_priority].
    max_abs_priority: int = 1000
    max_messages: int = 1000  # chat messages per request
    max_content_parts: int = 256  # content parts per chat message
    # Nesting of the JSON body ([ and {); json.loads would hit Python's recursion limit
    # (a 500) near 1,000. A chat body nests 5 deep; a schema adds its own depth.
    max_json_depth: int = 64
    # Every JSON schema (response_format, structured_outputs.json, each tool's parameters),
    # checked before its grammar is compiled: bytes of the compact serialized schema, and
    # its nesting depth (each nested object is 2 levels: "properties" and the property's
    # schema). The bytes also bound a structured_outputs regex or grammar.
    max_schema_bytes: int = 65536
    max_schema_depth: int = 32
    max_tools: int = 128  # tools per chat request (OpenAI's limit)
    max_logit_bias: int = 300  # logit_bias entries per request (OpenAI's limit)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in ("max_request_prompt_tokens", "max_output_tokens"):
                continue
            low = 0 if field.name in ("max_logprobs", "max_abs_priority") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{flag(field.name)} must be an integer >= {low}, got {value!r}")
        if self.max_logprobs > SamplingParams.MAX_LOGPROBS:
            raise InputError(
                f"--max-logprobs must be at most {SamplingParams.MAX_LOGPROBS} (the engine's "
                f"ceiling), got {self.max_logprobs}"
            )

    def resolved(self, max_request_tokens: int) -> RequestLimits:
        """These limits with the engine-derived defaults filled in."""
        return dataclasses.replace(
            self,
            max_request_prompt_tokens=self.max_request_prompt_tokens
            or PROMPT_TOKENS_PER_REQUEST_FACTOR * max_request_tokens,
            max_output_tokens=self.max_output_tokens or max_request_tokens,
        )


def over_limit(what: str, value, name: str, limit) -> InputError:
    """The 400 for `what` (the value given) beyond the limit `name`."""
    return InputError(f"{what} is {value}, over the limit of {limit} ({flag(name)})")


def check_at_most(what: str, value: int, name: str, limit: int) -> None:
    if value > limit:
        raise over_limit(what, value, name, limit)


def check_range(what: str, value: int, low: int, high: int, name: str) -> None:
    if not low <= value <= high:
        raise InputError(f"{what} must be in [{low}, {high}] ({flag(name)}), got {value}")


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value: 0 for a scalar, 1 for a flat list or object.

    Recursive: only call it on values parsed under --max-json-depth.
    """
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0


# ---------------------------------------------------------------------------- checks


def check_request(body, limits: RequestLimits, num_prompts: int = 1) -> None:
    """The bounds on a chat or completion request's fields, checked before its prompt is
    rendered or tokenized. `body` is a protocol.SamplingRequest; `num_prompts` its batch."""
    check_range("n", body.n, 1, limits.max_n, "max_n")
    choices = num_prompts * body.n
    if choices > limits.max_request_choices:
        raise InputError(
            f"prompts x n is {num_prompts} x {body.n} = {choices} engine requests, over the "
            f"limit of {limits.max_request_choices} ({flag('max_request_choices')})"
        )
    body.check_seed(choices)
    bound = limits.max_abs_priority
    check_range("priority", body.priority, -bound, bound, "max_abs_priority")
    stop = body.stop_list()
    check_at_most(
        "the number of stop strings", len(stop), "max_stop_strings", limits.max_stop_strings
    )
    for i, text in enumerate(stop):
        what = f"the length of stop[{i}] in characters"
        check_at_most(what, len(text), "max_stop_chars", limits.max_stop_chars)
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name, None)
        if value is not None:  # below 1, SamplingParams.validate names the value
            check_at_most(name, value, "max_output_tokens", limits.max_output_tokens)
    for name in ("top_logprobs", "logprobs"):
        value = getattr(body, name, None)
        if value is not None and not isinstance(value, bool):
            check_range(name, value, 0, limits.max_logprobs, "max_logprobs")
    if body.logit_bias:
        what = "the number of logit_bias entries"
        check_at_most(what, len(body.logit_bias), "max_logit_bias", limits.max_logit_bias)
    spec = body.response_format.json_schema if body.response_format else None
    if spec is not None and spec.json_schema is not None:
        check_schema(spec.json_schema, limits, "response_format.json_schema.schema")
    check_structured_outputs(body.structured_outputs, limits)
    tools = getattr(body, "tools", None) or []
    check_at_most("the number of tools", len(tools), "max_tools", limits.max_tools)
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, limits, f"tools[{i}].function.parameters")


def check_structured_outputs(spec, limits: RequestLimits) -> None:
    """A structured_outputs schema, regex or grammar, before it is compiled."""
    if spec is None:
        return
    if isinstance(spec.json_schema, dict):
        check_schema(spec.json_schema, limits, "structured_outputs.json")
    for key, text in (
        ("json", spec.json_schema),
        ("regex", spec.regex),
        ("grammar", spec.grammar),
    ):
        if isinstance(text, str):
            what = f"the size of structured_outputs.{key} in bytes"
            size = len(text.encode())
            check_at_most(what, size, "max_schema_bytes", limits.max_schema_bytes)
    if isinstance(spec.json_schema, str):  # JSON text: its depth, before it is parsed
        depth = json_nesting(spec.json_schema)
        what = "the nesting depth of structured_outputs.json"
        check_at_most(what, depth, "max_schema_depth", limits.max_schema_depth)


def check_schema(schema: dict, limits: RequestLimits, where: str) -> None:
    """A JSON schema's size and depth, before its grammar is compiled; `where` names the
    request field it came from."""
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise InputError(f"{where} holds a non-finite number (inf or nan)") from exc
    size = len(text.encode())
    check_at_most(
        f"the size of {where} in bytes (compact JSON)",
        size,
        "max_schema_bytes",
        limits.max_schema_bytes,
    )
    depth = json_depth(schema)
    check_at_most(
        f"the nesting depth of {where}", depth, "max_schema_depth", limits.max_schema_depth
    )


def check_messages(messages: list, limits: RequestLimits) -> None:
    """Chat messages and their content parts, before the chat template renders them."""
    check_at_most("the number of messages", len(messages), "max_messages", limits.max_messages)
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            check_at_most(
                f"the number of content parts in messages[{i}]",
                len(message.content),
                "max_content_parts",
                limits.max_content_parts,
            )


def check_prompt_tokens(prompt_tokens: int, n: int, limits: RequestLimits) -> None:
    """The prompt tokens the engine would prefill for the request (all prompts, n each),
    before any engine request is built."""
    total = prompt_tokens * n
    limit = limits.max_request_prompt_tokens
    if limit is not None and total > limit:
        raise InputError(
            f"prompt tokens x n is {prompt_tokens} x {n} = {total}, over the limit of {limit} "
            f"({flag('max_request_prompt_tokens')})"
        )
