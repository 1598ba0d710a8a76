"""Tool calling on /v1/chat/completions, driven by the openai SDK against a real uvicorn on
127.0.0.1 and the bundled model: calls whose arguments validate, streaming reconstructed by
the SDK's own accumulator, auto / none / named / required, history with tool results, and
every malformed tool request a 400 naming its field while other requests carry on."""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import pytest
from helpers import live_server

from lmstack.server.app import create_app

MODEL = "smollm2-135m-instruct"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}


def tool(name: str, schema: dict | None, strict: bool = False) -> dict:
    function = {"name": name, "description": f"the {name.replace('_', ' ')}"}
    if schema is not None:
        function["parameters"] = schema
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


TOOLS = [tool("get_weather", WEATHER_SCHEMA), tool("get_time", TIME_SCHEMA)]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def base_url(engine):
    with live_server(create_app(engine, MODEL, max_body_bytes=1_000_000)) as url:
        yield url


def assert_valid_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---------------------------------------------------------------------------- calls


def test_required_returns_a_call_whose_arguments_validate(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
        parallel_tool_calls=False, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls)


def test_parallel_calls_each_validate(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=100,
        temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    calls = choice.message.tool_calls
    # The bundled model, allowed more than one call, keeps calling until max_tokens: the
    # last call may then be cut short (finish_reason "length", as OpenAI reports it).
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert choice.finish_reason in ("tool_calls", "length") and complete
    assert_valid_calls(complete)


def test_named_function_is_the_one_called_exactly_once(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert_valid_calls(calls, names=("get_time",))


def test_a_function_without_parameters_is_called_with_an_empty_object(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[tool("ping", None)], tool_choice="required",
        parallel_tool_calls=False, max_tokens=30, temperature=0,
    )  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}


def test_every_choice_of_n_makes_valid_calls(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
        parallel_tool_calls=False, n=2, seed=3, temperature=1.0,
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message.tool_calls)


def test_streamed_calls_are_reconstructed_by_the_sdk(client, http):
    tools = [tool("get_weather", WEATHER_SCHEMA, strict=True)]
    kwargs = dict(model=MODEL, messages=ASK, tools=tools, tool_choice="required", temperature=0,
                  parallel_tool_calls=False)  # fmt: skip
    whole = client.chat.completions.create(**kwargs, max_tokens=120)
    with client.chat.completions.stream(**kwargs, max_tokens=120) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert done and all(e.name == "get_weather" for e in done)
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    streamed = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    expected = [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
    ]
    assert streamed == expected
    for call in choice.message.tool_calls:  # the SDK parsed them against the strict tool
        jsonschema.validate(call.function.parsed_arguments, WEATHER_SCHEMA)
    # OpenAI's chunk shape: the first delta of a call names it, with empty arguments.
    body = {**kwargs, "tools": tools, "max_tokens": 120, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    first = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d]
    assert len(fragments) >= 3  # arguments arrive as they are generated


def test_auto_returns_text_or_valid_calls(client):
    for messages in (ASK, [{"role": "user", "content": "Say hello."}]):
        r = client.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, max_tokens=60, temperature=0
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            assert_valid_calls(choice.message.tool_calls)
        else:
            assert choice.message.content and "<tool_call>" not in choice.message.content
            assert choice.finish_reason in ("stop", "length")


def test_none_returns_text_and_leaves_the_tools_out_of_the_prompt(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0)
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=16, temperature=0
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens


def test_history_with_calls_and_results_renders_in_the_documented_format(client, engine):
    arguments = '{"city": "Paris", "unit": "celsius"}'
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=24,
        temperature=0,
    )  # fmt: skip
    assert r.choices[0].message.content
    rendered = [
        ASK[0],
        {"role": "assistant", "content": '<tool_call>\n{"name":"get_weather","arguments":'
         '{"city":"Paris","unit":"celsius"}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\n18 degrees, sunny\n</tool_response>"},
    ]  # fmt: skip
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode_chat(rendered))


# ---------------------------------------------------------------------------- bad input

BAD_TOOL = tool("broken", {"type": "nonsense"})
BAD_ARGUMENTS = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
BAD = [
    ({"tools": [BAD_TOOL], "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": TOOLS + [BAD_TOOL]}, "tools[2].function.parameters does not compile"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name 'nope'",
    ),
    ({"tools": [tool("bad name!", None)]}, "tools[0].function.name"),
    ({"tools": [tool("x", None), tool("x", None)]}, "tools[1].function.name 'x' repeats"),
    ({"tool_choice": "required"}, "needs tools"),
    (
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
        "cannot be combined with response_format",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "foo": 1}}]},
        "'tools[0].function.foo'",
    ),
    (
        {"messages": ASK + [{"role": "tool", "content": "18 degrees"}]},
        "messages[1].tool_call_id is required",
    ),
    (
        {"messages": ASK + [{"role": "assistant", "tool_calls": [BAD_ARGUMENTS]}]},
        "messages[1].tool_calls[0].function.arguments is not valid JSON",
    ),
    ({"functions": [{"name": "f"}]}, "unsupported field 'functions'"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_tool_requests_are_a_400_naming_the_field(http, extra, message):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"], r.json()["error"]["message"]


def test_bad_tool_requests_leave_a_running_stream_alone(base_url, http):
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required"}
    body |= {"parallel_tool_calls": False, "max_tokens": 120, "temperature": 0, "stream": True}
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
            lines.extend(r.iter_lines())

    thread = threading.Thread(target=stream)
    thread.start()
    for extra, _ in BAD:
        assert http.post("/v1/chat/completions", json={"messages": ASK, **extra}).status_code == 400
    thread.join(timeout=120)
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" or lines[-2:] == ["data: [DONE]", ""]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert reasons[-1] == "tool_calls"
    assert not any("error" in c for c in chunks)
