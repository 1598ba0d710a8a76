"""Hypothesis-generated bodies for /v1/chat/completions and /v1/completions.

Every body, well-formed or not, must get a 2xx or a 4xx in OpenAI's error shape within a
time bound: never a 500, a dropped connection or a hang. The strategies mix plausible
requests (so that validation is passed and the engine runs) with wrong types, huge and
non-finite numbers, odd unicode, deep nesting and raw bytes that are not JSON at all.
Examples are derandomized so a CI run is reproducible; LMSTACK_FUZZ_EXAMPLES raises the count.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from helpers import live_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.server.app import create_app

MODEL = "smollm2-135m-instruct"
EXAMPLES = int(os.environ.get("LMSTACK_FUZZ_EXAMPLES", "100"))
BOUND_S = 30.0  # one request, streamed to the end; a valid one generates at most 8 tokens

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ---------------------------------------------------------------------------- strategies

text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "Say hi.", "\x00", "\ud7ff\ue000", "<|im_start|>system", "💥" * 8]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=3000),
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 0.5, 2**31, 2**63, 1e308, -1e308]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
small_int = st.integers(min_value=0, max_value=8)
probability = st.floats(min_value=0, max_value=1)


def field(good, *, also=json_values):
    """A field's value: mostly a plausible one, sometimes anything at all."""
    return st.one_of(good, good, also)


message = st.fixed_dictionaries(
    {
        "role": field(st.sampled_from(["user", "system", "assistant"])),
        "content": field(
            st.one_of(
                text,
                st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2
                ),
            )
        ),
    },
    optional={"name": field(text)},
)

# max_tokens is always sent: without it a valid request generates up to the context length,
# which is slow, not wrong. Its wrong values are all ones a server must refuse.
bad_max_tokens = st.one_of(
    text,
    st.lists(scalars, max_size=3),
    st.integers(min_value=10**7),
    st.integers(max_value=-1),
    st.floats(min_value=1e7),
    st.floats(allow_nan=False, max_value=-1e-9),
    st.sampled_from([0.5, 2.25, 1e999, -1e999]),
)
COMMON = {
    "model": field(st.sampled_from([MODEL, None])),
    "temperature": field(st.floats(min_value=0, max_value=2)),
    "top_p": field(probability),
    "top_k": field(st.integers(min_value=-1, max_value=50)),
    "min_p": field(probability),
    "n": field(st.integers(min_value=1, max_value=2)),
    "stream": field(st.booleans()),
    "stop": field(st.one_of(text, st.lists(text, max_size=5))),
    "seed": field(st.integers(min_value=0, max_value=2**32)),
    "presence_penalty": field(st.floats(min_value=-2, max_value=2)),
    "frequency_penalty": field(st.floats(min_value=-2, max_value=2)),
    "logprobs": field(st.booleans()),
    "priority": field(st.integers(min_value=-10, max_value=10)),
    "user": field(text),
}

chat_body = st.fixed_dictionaries(
    {
        "messages": field(st.lists(message, min_size=1, max_size=4)),
        "max_tokens": field(small_int, also=bad_max_tokens),
    },
    optional={
        **COMMON,
        "top_logprobs": field(st.integers(min_value=0, max_value=5)),
        "response_format": field(
            st.sampled_from(
                [
                    {"type": "text"},
                    {"type": "json_object"},
                    {
                        "type": "json_schema",
                        "json_schema": {
                            "name": "x",
                            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                        },
                    },
                ]
            )
        ),
        "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    },
)
completion_body = st.fixed_dictionaries(
    {
        "prompt": field(st.one_of(text, st.lists(text, min_size=1, max_size=2))),
        "max_tokens": field(small_int, also=bad_max_tokens),
    },
    optional={**COMMON, "echo": field(st.booleans())},
)


def deep(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"messages"',
            b'{"messages": [',
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}',
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            b'{"prompt": "\xff\xfe"}',
            deep(100),
            deep(5_000),
            deep(100_000),
        ]
    ),
)

# ---------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def http():
    from lmstack.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(num_kv_tokens=8192)
    try:
        with (
            live_server(create_app(engine, MODEL, max_body_bytes=1_000_000)) as url,
            httpx.Client(base_url=url, timeout=BOUND_S) as client,
        ):
            yield client
    finally:
        engine.shutdown()


def send(http: httpx.Client, path: str, content: bytes) -> None:
    started = time.monotonic()
    headers = {"Content-Type": "application/json"}
    with http.stream("POST", path, content=content, headers=headers) as r:
        body = r.read()  # a stream too: to its end
    took = time.monotonic() - started
    assert took < BOUND_S, f"{path} took {took:.1f} s"
    assert r.status_code < 500, f"{path} -> {r.status_code}: {body[:300]!r} for {content[:300]!r}"
    if r.status_code >= 400:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"], body
        assert isinstance(error["type"], str), body
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
    else:
        json.loads(body)


def encode(body: dict) -> bytes:
    # allow_nan: json.dumps writes inf as Infinity, which the server must refuse too.
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


@pytest.mark.slow
@FUZZ
@given(body=chat_body)
def test_fuzzed_chat_bodies_get_2xx_or_4xx(http, body):
    send(http, "/v1/chat/completions", encode(body))


@pytest.mark.slow
@FUZZ
@given(body=completion_body)
def test_fuzzed_completion_bodies_get_2xx_or_4xx(http, body):
    send(http, "/v1/completions", encode(body))


@pytest.mark.slow
@FUZZ
@given(raw=raw_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_raw_bytes_get_4xx(http, raw, path):
    send(http, path, raw)
