"""The apps' model API: the in-process engine and an OpenAI-compatible URL, one interface."""

from __future__ import annotations

import json

import pytest
from helpers import live_server

from lmstack.errors import InputError, LmstackError
from lmstack.llm import ChatRequest, OpenAIGenerator, make_generator

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Lyon"]},
        "rank": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
}


def _ask(text: str, **kwargs) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kwargs)


@pytest.fixture(scope="module")
def engine_gen():
    gen = make_generator()
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def remote_gen(engine_gen):
    from lmstack.server.app import create_app

    with live_server(create_app(engine_gen.async_engine, "smollm2")) as url:
        yield OpenAIGenerator(url + "/v1")


@pytest.mark.parametrize("which", ["engine", "remote"])
def test_same_greedy_answer_both_ways(engine_gen, remote_gen, which):
    gen = engine_gen if which == "engine" else remote_gen
    request = _ask("What is the capital of France?", max_tokens=12)
    reference = engine_gen.complete(request)
    result = gen.complete(request)
    assert result.error is None and result.text == reference.text
    assert result.completion_tokens == reference.completion_tokens > 0
    assert "".join(gen.stream(request)) == reference.text
    assert gen.prompt_tokens(request.messages) == reference.prompt_tokens


@pytest.mark.parametrize("which", ["engine", "remote"])
def test_many_in_order_and_schema_valid(engine_gen, remote_gen, which):
    gen = engine_gen if which == "engine" else remote_gen
    requests = [
        _ask(f"Give a JSON object with a French city and the number {i}.", max_tokens=64,
             json_schema=SCHEMA)
        for i in range(6)
    ]  # fmt: skip
    done = []
    results = gen.complete_many(requests, on_done=lambda i, c: done.append(i))
    assert sorted(done) == list(range(6))
    for result in results:
        assert result.finish_reason == "stop", result
        data = json.loads(result.text)  # constrained decoding: always parses
        assert data["city"] in ("Paris", "Lyon") and isinstance(data["rank"], int)


def test_bad_requests_fail_alone(engine_gen, remote_gen):
    too_long = _ask("hi", max_tokens=10**6)
    for gen in (engine_gen, remote_gen):
        results = gen.complete_many([too_long, _ask("Say hi.", max_tokens=4)])
        assert results[0].error and "max_tokens" in results[0].error
        assert results[1].error is None and results[1].text


def test_remote_errors_are_clear(remote_gen):
    with pytest.raises(InputError, match="http"):
        OpenAIGenerator("localhost:1234")
    with pytest.raises(LmstackError, match="cannot reach"):
        OpenAIGenerator("http://127.0.0.1:9")
    assert remote_gen.context_window == 8192 and remote_gen.model == "smollm2"


def test_frequency_penalty_reaches_the_model_both_ways(engine_gen, remote_gen):
    # A prompt that makes the unpenalized model repeat itself at every precision (the
    # greedy text must not depend on one CPU's rounding), so the penalty must change it.
    text = "Repeat this line exactly: cat cat cat cat cat cat cat cat cat cat"
    base = engine_gen.complete(_ask(text, max_tokens=16))
    assert base.text.lower().split().count("cat") >= 8, base.text
    penalized = _ask(text, max_tokens=16, frequency_penalty=2.0)
    local = engine_gen.complete(penalized)
    assert local.error is None
    assert local.text.lower().split().count("cat") < base.text.lower().split().count("cat")
    assert remote_gen.complete(penalized).text == local.text
    bad = engine_gen.complete(_ask(text, max_tokens=4, frequency_penalty=9.0))
    assert bad.error and "frequency_penalty" in bad.error
