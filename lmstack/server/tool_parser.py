"""Reading tool calls back out of one choice's generated text, as it streams.

The grammar (lmstack.server.tools) fixes the shape of every call to
`<tool_call>\\n{"name":"NAME","arguments":ARGS}\\n</tool_call>`, ARGS compact JSON, so the
text splits without guessing: what comes before the first `<tool_call>` is the message
content, then each call. The parser turns text deltas into OpenAI's chat deltas: content
as it comes (holding back a tail that could be the start of `<tool_call>`), then per call
one delta with its index, id, type, name and empty arguments, then argument fragments
(holding back the tail that could be the closing `}\\n</tool_call>`). Fed the whole text
at once, the same deltas assemble the non-streamed message, so both paths agree, a call
cut short by max_tokens included (its arguments are then incomplete, as OpenAI's are,
and finish_reason says "length"; a further call cut off before its name is dropped).
"""

from __future__ import annotations

import re
import uuid

from lmstack.server.tools import CALL_CLOSE, CALL_OPEN

_HEAD = re.compile(r'\n\{"name":"([A-Za-z0-9_-]{1,64})","arguments":')
_HEAD_MAX = len('\n{"name":"","arguments":') + 64  # longer and no match: not a call
_TAIL = "}\n" + CALL_CLOSE  # closes the call object, then the tag
_NEXT = "\n" + CALL_OPEN  # between parallel calls


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """One choice's text -> chat deltas: {"content": ...} and {"tool_calls": [...]}."""

    def __init__(self) -> None:
        self.state = "text"  # text | head | args | between
        self.buffer = ""
        self.content = ""
        self.calls: list[dict] = []  # {"id", "type", "function": {"name", "arguments"}}

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        deltas: list[dict] = []
        steps = {
            "text": self._step_text,
            "head": self._step_head,
            "args": self._step_args,
            "between": self._step_between,
        }
        while True:
            step = steps[self.state]()
            if step is None:
                return deltas
            if step:
                deltas.append(step)

    def finish(self) -> list[dict]:
        """The held-back tail, once the text is complete."""
        rest, self.buffer = self.buffer, ""
        if self.state == "args" and rest:
            return [self._arguments(rest)]
        if self.state == "head":
            if self.calls:
                # After a call the grammar allows only further calls, so this is the next
                # one cut short by max_tokens before its name was complete: it is no
                # content, and finish_reason "length" already says it was cut.
                return []
            rest = CALL_OPEN + rest  # an opening tag that never became a call: text
        if self.state in ("text", "head") and rest:
            return [self._text(rest)]
        return []

    def message(self) -> tuple[str | None, list[dict]]:
        """The whole message: content (None when empty, as OpenAI sends it beside calls)
        and the calls."""
        content = self.content
        if self.calls and not content.strip():
            content = None
        return content, self.calls

    # Each step consumes what it can from the buffer: a delta, {} (progress, nothing to
    # send) or None (it needs more text).

    def _text(self, text: str) -> dict:
        self.content += text
        return {"content": text}

    def _arguments(self, piece: str) -> dict:
        call = self.calls[-1]
        call["function"]["arguments"] += piece
        return {"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]}

    def _step_text(self) -> dict | None:
        at = self.buffer.find(CALL_OPEN)
        if at >= 0:
            before, self.buffer = self.buffer[:at], self.buffer[at + len(CALL_OPEN) :]
            self.state = "head"
            return self._text(before) if before else {}
        keep = _partial_prefix(self.buffer, CALL_OPEN)
        ready = self.buffer[: len(self.buffer) - keep]
        if not ready:
            return None
        self.buffer = self.buffer[len(ready) :]
        return self._text(ready)

    def _step_head(self) -> dict | None:
        match = _HEAD.match(self.buffer)
        if match is None:
            if len(self.buffer) < _HEAD_MAX:  # may still become one
                return None
            text, self.buffer = CALL_OPEN + self.buffer, ""
            self.state = "text"
            return self._text(text)
        self.buffer = self.buffer[match.end() :]
        self.state = "args"
        name, ident = match.group(1), call_id()
        self.calls.append(
            {"id": ident, "type": "function", "function": {"name": name, "arguments": ""}}
        )
        first = {"index": len(self.calls) - 1, "id": ident, "type": "function"}
        return {"tool_calls": [{**first, "function": {"name": name, "arguments": ""}}]}

    def _step_args(self) -> dict | None:
        at = self.buffer.find(_TAIL)
        if at >= 0:
            piece, self.buffer = self.buffer[:at], self.buffer[at + len(_TAIL) :]
            self.state = "between"
            return self._arguments(piece) if piece else {}
        keep = _partial_prefix(self.buffer, _TAIL)
        ready = self.buffer[: len(self.buffer) - keep]
        if not ready:
            return None
        self.buffer = self.buffer[len(ready) :]
        return self._arguments(ready)

    def _step_between(self) -> dict | None:
        if self.buffer.startswith(_NEXT):
            self.buffer = self.buffer[len(_NEXT) :]
            self.state = "head"
            return {}
        if _NEXT.startswith(self.buffer):
            return None  # empty, or a prefix of the next opening
        # The grammar allows nothing else after a call; whatever it is, it is not a call.
        self.buffer = ""
        return None
