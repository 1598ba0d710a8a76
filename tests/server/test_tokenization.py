"""vLLM's /tokenize, /detokenize and /version, and vLLM's `model_name` label on /metrics,
against a real uvicorn on 127.0.0.1 around the bundled model (an app without an embedder:
/v1/embeddings is absent there)."""

from __future__ import annotations

import re

import httpx
import pytest
from helpers import live_server

import lmstack
from lmstack.server.app import create_app

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def base_url(engine):
    with live_server(create_app(engine, MODEL)) as url:
        yield url


def usage(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json={**body, "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def test_tokenize_a_prompt_counts_what_completions_count(http, engine):
    r = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == engine.tokenizer.encode(PROMPT)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.max_model_len
    assert body["token_strs"] is None
    assert body["count"] == usage(http, "/v1/completions", {"prompt": PROMPT})["prompt_tokens"]
    back = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}


def test_tokenize_a_chat_as_chat_completions_renders_it(http, engine):
    body = http.post("/tokenize", json={"messages": HELLO, "return_token_strs": True}).json()
    assert body["tokens"] == engine.tokenizer.encode_chat(HELLO, True)
    assert (
        body["count"] == usage(http, "/v1/chat/completions", {"messages": HELLO})["prompt_tokens"]
    )
    assert body["token_strs"] == [engine.tokenizer.id_to_token(t) for t in body["tokens"]]
    # Special tokens survive the round trip: the template's markup comes back.
    prompt = http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert prompt == engine.tokenizer.apply_chat_template(HELLO) and "<|im_start|>" in prompt
    bare = http.post("/tokenize", json={"messages": HELLO, "add_generation_prompt": False}).json()
    assert bare["count"] < body["count"] and body["tokens"][: bare["count"]] == bare["tokens"]


BAD = [
    ("/detokenize", {"tokens": [5, -1]}, 400, r"tokens\[1\] is -1: .* \[0, 49152\)", "tokens[1]"),
    ("/detokenize", {"tokens": [49152]}, 400, r"tokens\[0\] is 49152", "tokens[0]"),
    ("/detokenize", {"tokens": ["a"]}, 400, r"tokens\[0\]", "tokens[0]"),
    ("/detokenize", {"tokens": [1.5]}, 400, r"tokens\[0\]", "tokens[0]"),
    ("/detokenize", {}, 400, "tokens: field required", "tokens"),
    ("/tokenize", {"prompt": "hi", "messages": HELLO}, 400, "got both", None),
    ("/tokenize", {"model": MODEL}, 400, "got neither", None),
    ("/tokenize", {"prompt": "hi", "model": "gpt-4o"}, 404, "gpt-4o", "model"),
    ("/detokenize", {"tokens": [1], "model": "gpt-4o"}, 404, "gpt-4o", "model"),
    (
        "/tokenize",
        {"messages": HELLO, "continue_final_message": True, "add_generation_prompt": False},
        400,
        "continue_final_message is not supported",
        "continue_final_message",
    ),
    ("/tokenize", {"messages": []}, 400, "at least one message", "messages"),
]


@pytest.mark.parametrize("path, body, status, message, param", BAD)
def test_bad_requests_get_a_4xx_naming_the_value(http, path, body, status, message, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert re.search(message, error["message"]), error["message"]
    assert error["param"] == param


def test_version(http):
    assert http.get("/version").json() == {"version": lmstack.__version__}


def test_tokenize_needs_the_api_key_version_does_not(engine):
    with live_server(create_app(engine, MODEL, api_key="k3y")) as url:
        assert httpx.post(f"{url}/tokenize", json={"prompt": "hi"}).status_code == 401
        keyed = {"Authorization": "Bearer k3y"}
        r = httpx.post(f"{url}/tokenize", json={"prompt": "hi"}, headers=keyed)
        assert r.status_code == 200 and r.json()["count"] >= 1
        assert httpx.get(f"{url}/version").status_code == 200


def test_every_metric_carries_model_name(http):
    usage(http, "/v1/completions", {"prompt": "Hi", "ignore_eos": True})
    lines = [x for x in http.get("/metrics").text.splitlines() if x.startswith("lmstack:")]
    assert len({x.split("{")[0].split(" ")[0] for x in lines}) >= 16
    unlabelled = [x for x in lines if f'model_name="{MODEL}"' not in x]
    assert not unlabelled, unlabelled[:5]
    assert f'lmstack:num_requests_running{{model_name="{MODEL}"}} 0.0' in lines


def test_no_embedder_no_embeddings_route(http):
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [MODEL]
    assert http.post("/v1/embeddings", json={"input": "hi"}).status_code == 404
