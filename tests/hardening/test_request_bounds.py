"""Bounds on one request's work (lmstack/server/limits.py), against a real uvicorn server.

Each bound is refused with a 400 in OpenAI's error shape whose message names the value
given, the limit and the `lmstack serve` flag that sets it, before any engine request is
built. Requests that a bound must not catch are sent too, so a bound that refuses too much
fails here as well.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import typing

import httpx
import pytest
from helpers import free_port, live_server, run_cli, wait_for

from lmstack.engine.sampling_params import SamplingParams
from lmstack.errors import InputError
from lmstack.server import protocol as p
from lmstack.server.app import create_app
from lmstack.server.limits import RequestLimits

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
CHAT = {"messages": HELLO, "max_tokens": 1}


@pytest.fixture(scope="module")
def http(engine):
    with (
        live_server(create_app(engine, MODEL)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def tight(engine):
    """A server whose limits are set small, as `lmstack serve --max-... N` would."""
    limits = RequestLimits(max_request_prompt_tokens=100, max_output_tokens=4, max_n=3)
    with (
        live_server(create_app(engine, MODEL, limits=limits)) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield client


def refused(response: httpx.Response, *needles: str) -> str:
    """Assert a 400 in OpenAI's error shape whose message holds every needle."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])
    return error["message"]


def post_raw(http: httpx.Client, path: str, text: str) -> httpx.Response:
    return http.post(path, content=text.encode(), headers={"content-type": "application/json"})


# ---------------------------------------------------------------------------- numbers


def float_fields(model: type) -> list[str]:
    """Every field of `model` that takes a float (float, float | None, ...)."""
    names = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if annotation is float or float in typing.get_args(annotation):
            names.append(name)
    return names


CHAT_FLOATS = float_fields(p.ChatCompletionRequest)
COMPLETION_FLOATS = float_fields(p.CompletionRequest)


def test_every_known_float_field_is_covered():
    known = {"temperature", "top_p", "presence_penalty", "frequency_penalty", "timeout"}
    known |= {"min_p", "repetition_penalty"}
    assert known <= set(CHAT_FLOATS) and known <= set(COMPLETION_FLOATS)


@pytest.mark.parametrize("sign", ["", "-"])
@pytest.mark.parametrize(
    "path,field",
    [("/v1/chat/completions", f) for f in CHAT_FLOATS]
    + [("/v1/completions", f) for f in COMPLETION_FLOATS],
)
def test_1e999_in_a_float_field_is_refused_naming_it(http, path, field, sign):
    # json.loads turns 1e999 into inf, which passes `x >= 0` and `x > 0` range checks.
    base = CHAT if path.endswith("chat/completions") else {"prompt": "Hi", "max_tokens": 1}
    text = json.dumps(base)[:-1] + f', "{field}": {sign}1e999}}'
    assert math.isinf(json.loads(text)[field])
    refused(post_raw(http, path, text), field, "finite number")


@pytest.mark.parametrize(
    "name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"]
)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_engine_refuses_non_finite_sampling_params(engine, name, value):
    # What LLM() and add_request run for direct users, with no server in front.
    with pytest.raises(InputError, match=f"{name} must be a finite number"):
        engine.engine.add_request("Hi", SamplingParams(max_tokens=1, **{name: value}))


@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -1.0])
def test_engine_refuses_a_timeout_that_is_not_finite_and_positive(engine, value):
    # LLM()/engine users: an infinite timeout would silently mean "never expires".
    with pytest.raises(InputError, match="timeout must be a finite number of seconds > 0"):
        engine.engine.add_request("Hi", SamplingParams(max_tokens=1), timeout=value)


# ---------------------------------------------------------------------------- body shape


def test_deep_json_nesting_is_a_400_naming_the_depth_limit(http):
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    refused(post_raw(http, "/v1/chat/completions", deep), "100001", "64", "--max-json-depth")
    top_level = "[" * 100_000 + "]" * 100_000
    refused(post_raw(http, "/v1/completions", top_level), "100000", "--max-json-depth")
    # Brackets inside strings, escaped quotes included, are text, not nesting.
    content = 'a \\" ' + "[{" * 200
    text = '{"messages": [{"role": "user", "content": "' + content + '"}], "max_tokens": 1}'
    assert post_raw(http, "/v1/chat/completions", text).status_code == 200


def test_depth_scan_is_linear_on_unterminated_escaped_strings():
    # '"\\"\\"...' never closes: a string pattern retried from every escaped quote is
    # quadratic (32,000 of them took 33 s); the scan must stay linear.
    from lmstack.httpapi import json_nesting

    text = "[" * 70 + '"' + '\\"' * 200_000
    started = time.monotonic()
    assert json_nesting(text) == 70
    assert time.monotonic() - started < 0.5


def test_too_many_messages(http):
    messages = [{"role": "user", "content": "a"}] * 1001
    response = http.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    refused(response, "1001", "1000", "--max-messages")


def test_too_many_content_parts(http):
    parts = [{"type": "text", "text": "a"}] * 257
    messages = [{"role": "user", "content": parts}]
    response = http.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    refused(response, "messages[0]", "257", "256", "--max-content-parts")


# ---------------------------------------------------------------------------- sampling


def test_n_over_the_limit(http, tight):
    refused(http.post("/v1/chat/completions", json={**CHAT, "n": 65}), "65", "64", "--max-n")
    refused(tight.post("/v1/chat/completions", json={**CHAT, "n": 4}), "4", "3", "--max-n")
    assert tight.post("/v1/chat/completions", json={**CHAT, "n": 3}).status_code == 200


def test_huge_stop_list(http):
    stop = [f"s{i}" for i in range(10_000)]
    response = http.post("/v1/chat/completions", json={**CHAT, "stop": stop})
    refused(response, "10000", "16", "--max-stop-strings")


def test_stop_string_too_long(http):
    stop = ["ok", "x" * 257]
    response = http.post("/v1/chat/completions", json={**CHAT, "stop": stop})
    refused(response, "stop[1]", "257", "256", "--max-stop-chars")
    assert http.post("/v1/chat/completions", json={**CHAT, "stop": "x" * 256}).status_code == 200


@pytest.mark.parametrize("priority", [1001, -1001, 10**30])
def test_priority_out_of_range(http, priority):
    response = http.post("/v1/chat/completions", json={**CHAT, "priority": priority})
    refused(response, str(priority), "[-1000, 1000]", "--max-abs-priority")


def test_logprobs_over_the_limit(http):
    body = {**CHAT, "logprobs": True, "top_logprobs": 21}
    refused(http.post("/v1/chat/completions", json=body), "top_logprobs", "21", "--max-logprobs")
    body = {"prompt": "Hi", "max_tokens": 1, "logprobs": 21}
    refused(http.post("/v1/completions", json=body), "logprobs", "21", "20", "--max-logprobs")


def test_max_tokens_over_the_limit(http, engine, tight):
    window = str(engine.engine.max_request_tokens)
    body = {**CHAT, "max_tokens": 100_000}
    refused(http.post("/v1/chat/completions", json=body), "100000", window, "--max-output-tokens")
    body = {**CHAT, "max_completion_tokens": 5}
    refused(tight.post("/v1/chat/completions", json=body), "5", "4", "--max-output-tokens")
    # Without max_tokens, a chat completion may run up to the limit, and no further.
    body = {"messages": HELLO, "ignore_eos": True, "temperature": 0}
    reply = tight.post("/v1/chat/completions", json=body).json()
    assert reply["usage"]["completion_tokens"] == 4
    assert reply["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------- prompt work


def test_prompt_tokens_times_n_over_the_limit(tight):
    body = {"prompt": [[1] * 30, [2] * 30], "n": 2, "max_tokens": 1}
    refused(tight.post("/v1/completions", json=body), "60 x 2 = 120", "100")
    body = {"prompt": [[1] * 25, [2] * 25], "n": 2, "max_tokens": 1}  # exactly the limit
    assert tight.post("/v1/completions", json=body).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hello " * 60}], "n": 2, "max_tokens": 1}
    refused(tight.post("/v1/chat/completions", json=chat), "--max-request-prompt-tokens")


def test_default_prompt_token_limit_is_8_requests_of_the_window(http, engine):
    limit = 8 * engine.engine.max_request_tokens
    content = "hello " * (limit // 64 + 10)  # a token or more per word: over limit with n=64
    body = {"messages": [{"role": "user", "content": content}], "n": 64, "max_tokens": 1}
    refused(http.post("/v1/chat/completions", json=body), str(limit), "--max-request-prompt")


def test_too_many_engine_requests(http):
    body = {"prompt": [[1]] * 300, "max_tokens": 1}
    refused(http.post("/v1/completions", json=body), "300", "256", "--max-request-choices")


# ---------------------------------------------------------------------------- schemas


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_response_format_schema_too_deep(http):
    schema: dict = {"type": "integer"}
    for _ in range(20):  # 2 JSON levels per nested object: 41 deep, within the body's 64
        schema = {"type": "object", "properties": {"a": schema}}
    body = {**CHAT, "response_format": schema_format(schema)}
    refused(http.post("/v1/chat/completions", json=body), "41", "32", "--max-schema-depth")


def test_response_format_schema_too_big(http):
    properties = {f"p{i}": {"type": "string", "description": "x" * 60} for i in range(1000)}
    schema = {"type": "object", "properties": properties}
    size = len(json.dumps(schema, separators=(",", ":")))
    body = {"prompt": "Hi", "max_tokens": 1, "response_format": schema_format(schema)}
    refused(http.post("/v1/completions", json=body), str(size), "65536", "--max-schema-bytes")


def test_response_format_schema_with_a_non_finite_number(http):
    body = {**CHAT, "response_format": schema_format({"type": "number"})}
    text = json.dumps(body).replace('"type": "number"', '"type": "number", "maximum": 1e999')
    refused(post_raw(http, "/v1/chat/completions", text), "schema", "non-finite")


# ---------------------------------------------------------------------------- lmstack serve


def test_serve_refuses_a_bad_limit_in_one_line(capsys):
    code, _, err = run_cli(["serve", "--max-json-depth", "0"], capsys)
    assert code == 2
    assert "--max-json-depth must be an integer >= 1, got 0" in err


@pytest.mark.slow
def test_serve_flags_reach_the_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lmstack.cli", "serve", "--port", str(port)]
    command += ["--kv-cache-gb", "0.05", "--max-n", "2", "--max-abs-priority", "5"]
    with open(tmp_path / "stderr.log", "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=os.environ)
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            try:
                return httpx.get(f"{url}/ready").status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, 120, 0.3), "server never became ready"
        with httpx.Client(base_url=url, timeout=120) as client:
            response = client.post("/v1/chat/completions", json={**CHAT, "n": 3})
            refused(response, "3", "[1, 2]", "--max-n")
            response = client.post("/v1/chat/completions", json={**CHAT, "priority": 6})
            refused(response, "[-5, 5]", "--max-abs-priority")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
