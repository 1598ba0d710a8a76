"""structured_outputs (vLLM's json / regex / choice / grammar), logit_bias, and strict
request fields, against a real uvicorn on 127.0.0.1 and the bundled model."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from helpers import live_server

from lmstack.server.app import create_app

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name a fruit."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "fruit": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["fruit", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def base_url(engine):
    with live_server(create_app(engine, MODEL, max_body_bytes=1_000_000)) as url:
        yield url


def chat(client, structured: dict, messages=ASK, **kwargs) -> str:
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, temperature=0,
        extra_body={"structured_outputs": structured}, **kwargs,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    return r.choices[0].message.content


# ---------------------------------------------------------------------------- structured_outputs


@pytest.mark.parametrize("as_text", [False, True])
def test_json_schema_output_validates(client, as_text):
    schema = json.dumps(SCHEMA) if as_text else SCHEMA
    jsonschema.validate(json.loads(chat(client, {"json": schema})), SCHEMA)


def test_json_object(client):
    # Any object is allowed, so the prompt asks for a short one: on "Name a fruit." greedy
    # decoding of the 135M model may fill 40 tokens with an endless key under some precisions.
    ask = [{"role": "user", "content": 'Reply with the JSON object {"fruit": "apple"}.'}]
    assert isinstance(json.loads(chat(client, {"json_object": True}, messages=ask)), dict)


def test_regex(client):
    assert re.fullmatch(r"[A-Z][a-z]{2,8}!", chat(client, {"regex": r"[A-Z][a-z]{2,8}!"}))


def test_choice(client):
    assert chat(client, {"choice": ["apple", "pear", "plum"]}) in ("apple", "pear", "plum")


def test_lark_grammar(client):
    grammar = 'start: "I have " NUM " " FRUIT "."\nNUM: /[1-9][0-9]?/\nFRUIT: "apples" | "pears"'
    assert re.fullmatch(r"I have [1-9][0-9]? (apples|pears)\.", chat(client, {"grammar": grammar}))


def test_completions_take_structured_outputs_too(client):
    r = client.completions.create(
        model=MODEL, prompt="My favourite colour is", max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"choice": [" red", " blue"]}},
    )  # fmt: skip
    assert r.choices[0].text in (" red", " blue")


# ---------------------------------------------------------------------------- logit_bias


def test_a_large_positive_bias_makes_the_token_the_output(client, engine):
    token = engine.tokenizer.encode(" banana")[0]
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
        logit_bias={str(token): 100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].text == engine.tokenizer.decode([token] * 3)


def test_a_large_negative_bias_bans_the_greedy_token(client, engine):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0)
    greedy = client.completions.create(**kwargs).choices[0].text
    ban = {str(t): -100 for t in engine.tokenizer.encode(greedy)}
    biased = client.completions.create(**kwargs, logit_bias=ban)
    assert biased.choices[0].text != greedy
    assert client.completions.create(**kwargs).choices[0].text == greedy  # only that request
    chat = dict(model=MODEL, messages=ASK, max_tokens=1, temperature=0)
    first = client.chat.completions.create(**chat).choices[0].message.content
    ban = {str(t): -100 for t in engine.tokenizer.encode(first)}
    biased = client.chat.completions.create(**chat, logit_bias=ban)
    assert biased.choices[0].message.content != first


# ---------------------------------------------------------------------------- strict fields


def test_unknown_fields_are_a_400_naming_them(http):
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, "foo": 1})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith("unsupported field 'foo'") and error["param"] == "foo"
    r = http.post("/v1/completions", json={"prompt": "Hi", "best_of": 2, "echo_all": 1})
    assert "unsupported fields 'best_of', 'echo_all'" in r.json()["error"]["message"]
    messages = [{"role": "user", "content": "Hi", "bar": 2}]
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and "'messages[0].bar'" in r.json()["error"]["message"]


def test_harmless_metadata_is_accepted(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=2, user="u1", metadata={"run": "1"}, store=False,
        safety_identifier="s1",
    )  # fmt: skip
    assert r.choices[0].message.content is not None


def test_lenient_server_ignores_unknown_fields(engine):
    app = create_app(engine, MODEL, max_body_bytes=1_000_000, lenient=True)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        messages = [{"role": "user", "content": "Hi", "bar": 2}]
        body = {"messages": messages, "max_tokens": 2, "foo": 1, "stream_options": None}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        body = {"prompt": "Hi", "max_tokens": 2, "structured_outputs": {"choice": ["a"], "x": 1}}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "a"


# ---------------------------------------------------------------------------- bad input

NOT_COMPILED = "structured_outputs.{} does not compile"
BAD = [
    ({"structured_outputs": {"jsn": SCHEMA}}, "unsupported field 'structured_outputs.jsn'"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
    ({"structured_outputs": {}}, "exactly one of"),
    ({"structured_outputs": {"grammar": "start: ("}}, NOT_COMPILED.format("grammar")),
    ({"structured_outputs": {"grammar": "start: foo"}}, NOT_COMPILED.format("grammar")),
    ({"structured_outputs": {"regex": "[a-"}}, NOT_COMPILED.format("regex")),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, NOT_COMPILED.format("json")),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json is not valid JSON"),
    (
        {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
        "response_format and structured_outputs",
    ),
    ({"logit_bias": {"99999999": 5}}, "outside the vocabulary"),
    ({"logit_bias": {"12": 101}}, "logit_bias[12] must be in [-100, 100]"),
    ({"logit_bias": {"abc": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "over the limit of 300 (--max-logit-bias)"),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", BAD)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_constraints_are_a_400_naming_the_field(http, path, extra, message):
    base = {"messages": ASK} if path == "/v1/chat/completions" else {"prompt": "Hi"}
    r = http.post(path, json={**base, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"], r.json()["error"]["message"]


def test_server_serves_after_bad_constraints(http):
    body = {"prompt": "Hi", "max_tokens": 2, "structured_outputs": {"choice": ["yes", "no"]}}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")
