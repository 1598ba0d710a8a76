"""HTTP plumbing every lmstack route shares: OpenAI-shaped errors, JSON bodies, SSE.

A leaf: the OpenAI server (lmstack.server) and the apps' routers (docqa, triage, align,
the attention explainer) all use it, and it knows none of them. Errors travel as APIError
(status + OpenAI's error fields) and leave as {"error": {message, type, param, code}};
bodies are parsed here rather than by FastAPI, so malformed JSON, bad UTF-8 and a body
nested too deep are a 400 in that shape too, never FastAPI's 422 or a 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from lmstack.errors import InputError

DEFAULT_MAX_JSON_DEPTH = 64  # a chat body nests 5 deep; json.loads recurses near 1,000


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


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


def error_response(status: int, message: str, kind: str, param=None, code=None, headers=None):
    """A JSONResponse in OpenAI's error shape: {"error": {message, type, param, code}}."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ---------------------------------------------------------------------------- JSON bodies

# Possessive, and the closing quote optional: an unterminated string runs to the end in
# one pass instead of being retried from every later quote (quadratic on '"\\"\\"...').
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_nesting(text: str) -> int:
    """The deepest nesting of [ and { in JSON `text`, strings skipped (linear time)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_json_depth(text: str, max_depth: int) -> None:
    """InputError (a 400) when `text` nests deeper than `max_depth` (--max-json-depth)."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # cannot nest deeper than it has brackets: nearly every body stops here
    depth = json_nesting(text)
    if depth > max_depth:
        raise InputError(
            f"request body nests {depth} levels deep, over the limit of {max_depth} "
            f"(--max-json-depth)"
        )


async def parse_body(request, model: type[BaseModel]):
    """The request's JSON object validated as `model`; APIError (400) naming what is wrong.

    The depth limit is the app's `max_json_depth` state (set by `lmstack serve`), else the
    default. The app's `lenient` state (`lmstack serve --lenient`) reaches the models as the
    validation context {"lenient": True}: lmstack.server.fields drops unknown fields then
    instead of refusing them."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})") from exc
    depth = getattr(request.app.state, "max_json_depth", None) or DEFAULT_MAX_JSON_DEPTH
    check_json_depth(text, depth)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    context = {"lenient": bool(getattr(request.app.state, "lenient", False))}
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        message, param = describe(exc)
        raise APIError(400, message, param=param) from exc


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """One line for pydantic's errors: the field, what is wrong, and the value given."""
    errors = exc.errors()
    first = errors[0]
    loc = first["loc"]
    if all(err["type"] == "extra_forbidden" for err in errors):
        return _unsupported([_where(err["loc"]) for err in errors])
    if len(errors) > 1:
        # A union member that failed reports one error per alternative; name the field they
        # share rather than one alternative's complaint.
        shared = loc
        for err in errors[1:]:
            n = 0
            while n < min(len(shared), len(err["loc"])) and shared[n] == err["loc"][n]:
                n += 1
            shared = shared[:n]
        if shared:
            loc = shared
    where = _where(loc)
    if first["type"] == "missing":
        return f"{where}: field required", where
    got = json.dumps(first.get("input"), default=str)
    got = got if len(got) <= 80 else got[:77] + "..."
    what = "matches none of the accepted types" if loc != first["loc"] else first["msg"]
    return f"{where}: {what}, got {got}", where


def _where(loc: tuple) -> str:
    """A pydantic error location as a field path: messages[0].content."""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return where.lstrip(".") or "body"


def _unsupported(fields: list[str]) -> tuple[str, str]:
    names = ", ".join(f"'{name}'" for name in fields)
    noun, them = ("field", "it") if len(fields) == 1 else ("fields", "them")
    message = (
        f"unsupported {noun} {names}: lmstack does not implement {them} "
        f"(`lmstack serve --lenient` ignores unknown fields)"
    )
    return message, fields[0]


def _reject_constant(name: str):
    # json.loads accepts NaN and Infinity; a NaN temperature would pass every range check.
    raise ValueError(f"{name} is not a valid JSON number")


# ---------------------------------------------------------------------------- SSE

DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream that always runs `on_close`, however the stream ends.

    Starlette cancels the stream when the client disconnects; closing the event generator
    here also covers a stream that never started.
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


def event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def error_event(message: str, kind: str = "server_error") -> str:
    error = ErrorInfo(message=message, type=kind)
    return f"data: {ErrorResponse(error=error).model_dump_json()}\n\n"
