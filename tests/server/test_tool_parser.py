"""The tool-call parser on its own: the same calls however the text is split into deltas,
and what a call cut short by max_tokens leaves in the message."""

from __future__ import annotations

import json

import pytest

from lmstack.server.tool_parser import ToolCallParser
from lmstack.server.tools import CALL_CLOSE, CALL_OPEN


def call(name: str, args: dict) -> str:
    body = json.dumps({"name": name, "arguments": args}, separators=(",", ":"))
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def run(text: str, step: int) -> tuple[ToolCallParser, list[dict]]:
    parser = ToolCallParser()
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i : i + step])
    return parser, deltas + parser.finish()


TWO = "Let me check." + call("get_weather", {"city": "Paris"}) + "\n" + call("ping", {})


@pytest.mark.parametrize("step", [1, 2, 5, 17, len(TWO)])
def test_deltas_assemble_the_same_message_whatever_the_split(step):
    parser, deltas = run(TWO, step)
    content, calls = parser.message()
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("ping", {}),
    ]
    # The streamed deltas carry exactly the same content and argument text.
    assert "".join(d.get("content", "") for d in deltas) == "Let me check."
    streamed = ["", ""]
    for d in deltas:
        for tc in d.get("tool_calls", []):
            streamed[tc["index"]] += tc["function"]["arguments"]
    assert [json.loads(a) for a in streamed] == [{"city": "Paris"}, {}]


@pytest.mark.parametrize("cut", [1, 5, 12, 20])
def test_a_second_call_cut_before_its_name_leaves_no_markup_in_the_content(cut):
    first = call("get_weather", {"city": "Paris"})
    text = first + "\n" + call("get_weather", {"city": "Rome"})[: cut + len(CALL_OPEN)]
    for step in (1, 3, len(text)):
        parser, deltas = run(text, step)
        content, calls = parser.message()
        assert content is None and len(calls) == 1
        assert not any("content" in d for d in deltas)


def test_an_opening_tag_that_never_becomes_a_call_is_text():
    parser, deltas = run(CALL_OPEN + "\nnot a call at all", 4)
    content, calls = parser.message()
    assert calls == [] and content == CALL_OPEN + "\nnot a call at all"


def test_a_call_cut_in_its_arguments_keeps_the_fragment():
    parser, _ = run(call("get_weather", {"city": "Paris"})[:-20], 3)
    _, calls = parser.message()
    assert len(calls) == 1 and calls[0]["function"]["arguments"].startswith('{"city')
