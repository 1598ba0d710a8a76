"""POST /v1/embeddings end to end: a real uvicorn on 127.0.0.1, the real bundled MiniLM.

The openai SDK drives the happy paths (float, and base64 both as the SDK's default, which
it decodes, and asked for explicitly); httpx drives the limits and bad inputs, the batcher
(counted by its own metric) and `bench serve --endpoint embeddings`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import re
import sys

import httpx
import numpy as np
import pytest
from helpers import live_server

from lmstack.bench.loadgen import RequestSpec, embedding_specs, run_load
from lmstack.bench.serve import summarize
from lmstack.errors import InputError
from lmstack.server.app import create_app
from lmstack.server.embeddings import EmbeddingLimits

MODEL = "smollm2-135m-instruct"
EMBED = "all-MiniLM-L6-v2"
MAX_INPUTS = 40
TEXTS = ["The cat sat on the mat.", "Invoices are due within 30 days of receipt."]


@pytest.fixture(scope="module")
def embedder():
    from lmstack.embed import Embedder

    return Embedder.shared()


@pytest.fixture(scope="module")
def base_url(engine, embedder):
    limits = EmbeddingLimits(max_embedding_inputs=MAX_INPUTS)
    app = create_app(engine, MODEL, embedder=embedder, embedding_limits=limits)
    with live_server(app) as url:
        yield url


def embedding_samples(http: httpx.Client) -> dict[str, float]:
    """/metrics' lmstack:embedding_* samples, by name (all labelled with the model)."""
    samples = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("lmstack:embedding_") and 'le="' not in line:
            key, value = line.rsplit(" ", 1)
            assert f'{{model_name="{EMBED}"}}' in key, key
            samples[key.split("{")[0]] = float(value)
    return samples


def ids_of(embedder, text: str) -> list[int]:
    return embedder.model.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- the SDK


def test_openai_sdk_float_and_base64(client, embedder):
    expected = embedder.embed(TEXTS)
    r = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == EMBED
    assert [d.index for d in r.data] == [0, 1] and all(d.object == "embedding" for d in r.data)
    floats = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert floats.shape == (2, 384)
    np.testing.assert_allclose(floats, expected, atol=1e-6)
    tokens = sum(embedder.count_tokens(TEXTS))
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    # Without encoding_format the SDK asks for base64 and decodes it: the very same floats.
    default = client.embeddings.create(model=EMBED, input=TEXTS)
    assert np.array_equal(np.array([d.embedding for d in default.data], dtype=np.float32), floats)
    raw = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    assert np.array_equal(np.stack(decoded), floats)
    one = client.embeddings.create(model=EMBED, input=TEXTS[0], user="u-1", dimensions=384)
    assert len(one.data) == 1  # alone, not padded to the longer text: equal to rounding
    np.testing.assert_allclose(one.data[0].embedding, floats[0], atol=1e-6)


def test_token_id_inputs_are_decoded_with_the_embedders_tokenizer(http, embedder):
    ids = [ids_of(embedder, t) for t in TEXTS]
    r = http.post("/v1/embeddings", json={"model": EMBED, "input": ids})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    decoded = [embedder.decode(x) for x in ids]
    np.testing.assert_allclose(got, embedder.embed(decoded), atol=1e-6)
    assert float(got[0] @ embedder.embed(TEXTS)[0]) > 0.9999  # the text the ids spell
    assert r.json()["usage"]["prompt_tokens"] == sum(len(x) + 2 for x in ids)  # + [CLS] [SEP]
    single = http.post("/v1/embeddings", json={"input": ids[1]}).json()
    np.testing.assert_allclose(single["data"][0]["embedding"], got[1], atol=1e-6)


def test_concurrent_requests_share_forward_passes(http, embedder):
    texts = [f"Ticket {i}: my order arrived damaged, the box was open. " * 4 for i in range(16)]
    before = embedding_samples(http)

    def post(text: str) -> httpx.Response:
        return http.post("/v1/embeddings", json={"input": text})

    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(post, texts))
    assert all(r.status_code == 200 for r in responses)
    after = embedding_samples(http)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["lmstack:embedding_requests_total"] == 16
    assert delta["lmstack:embedding_inputs_total"] == 16
    assert delta["lmstack:embedding_batch_inputs_sum"] == 16
    passes = delta["lmstack:embedding_batches_total"]
    assert 1 <= passes < 16, f"{passes} forward passes for 16 concurrent requests"
    # Each request still gets its own vector, whatever it was batched with.
    got = np.array([r.json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-5)


# ---------------------------------------------------------------------------- refusals

LONG = "word " * 300  # 302 tokens with [CLS] and [SEP]
BAD = [
    ({"input": []}, 400, "input is an empty list", "input"),
    ({"input": ""}, 400, "input is an empty string", "input"),
    ({"input": ["ok", ""]}, 400, r"input\[1\] is an empty string", "input[1]"),
    (
        {"input": ["x"] * 41},
        400,
        r"inputs is 41, over the limit of 40 \(--max-embedding-inputs\)",
        "input",
    ),
    (
        {"input": ["short", LONG]},
        400,
        r"input\[1\] in tokens is 302, over the limit of 256 \(--max-embedding-input-tokens\)",
        "input[1]",
    ),
    ({"input": LONG}, 400, "the length of input in tokens is 302", "input"),
    ({"input": [[2023, -1]]}, 400, r"input\[0\] holds the token id -1", "input[0]"),
    ({"input": [7592, 10**6]}, 400, "token id 1000000, outside .*30522", "input"),
    ({"input": [[]]}, 400, r"input\[0\] is an empty list of token ids", "input[0]"),
    ({"input": [[101, 102]]}, 400, "only special tokens", "input[0]"),
    ({"input": ["a", 1]}, 400, "input: matches none", "input"),
    ({"input": [1.5]}, 400, "input", "input"),
    ({"model": EMBED}, 400, "input: field required", "input"),
    (
        {"input": "hi", "dimensions": 256},
        400,
        "dimensions is 256, .* 384-dimensional",
        "dimensions",
    ),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format", "encoding_format"),
    (
        {"input": "hi", "model": "text-embedding-3-small"},
        404,
        "does not exist.*all-MiniLM",
        "model",
    ),
    ({"input": "hi", "model": MODEL}, 400, "does not embed; /v1/embeddings serves", "model"),
]


@pytest.mark.parametrize("body, status, message, param", BAD)
def test_bad_requests_get_a_400_naming_the_field(http, body, status, message, param):
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert re.search(message, error["message"]), error["message"]
    assert error["param"] == param
    # Nothing else is affected.
    assert http.post("/v1/embeddings", json={"input": "still fine"}).status_code == 200


def test_limits_are_checked_at_start_up(engine, embedder):
    with pytest.raises(InputError, match="reads at most 256 tokens"):
        create_app(engine, MODEL, embedder=embedder, embedding_limits=EmbeddingLimits(1000, 512))
    with pytest.raises(InputError, match="--max-embedding-inputs must be an integer >= 1"):
        EmbeddingLimits(max_embedding_inputs=0)
    app = create_app(engine, MODEL, embedder=embedder, embedding_limits=EmbeddingLimits(8, 16))
    assert app.state.server.embeddings.limits.max_embedding_input_tokens == 16


# ---------------------------------------------------------------------------- models, metrics


def test_models_lists_the_embedding_model(http):
    cards = http.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [MODEL, EMBED]
    assert cards[1]["max_model_len"] == 256 and cards[1]["object"] == "model"
    assert cards[1]["dtype"] == "float32"
    text = http.get("/metrics").text
    for name in ("requests_total", "inputs_total", "prompt_tokens_total", "batches_total"):
        assert f'lmstack:embedding_{name}{{model_name="{EMBED}"}}' in text, name
    assert "# TYPE lmstack:embedding_request_latency_seconds histogram" in text


def test_without_sentence_transformers_the_route_is_absent(engine, monkeypatch, tmp_path):
    import lmstack.embed
    from lmstack.serve import build_app, load_embedder

    monkeypatch.setattr(lmstack.embed, "_shared", {})  # the loaded one would be reused
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import -> ImportError
    assert load_embedder() is None
    app = build_app(engine, MODEL, docs_store=str(tmp_path / "docs.db"))
    with live_server(app) as url:
        assert [c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]] == [MODEL]
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 404
        assert "lmstack:embedding_" not in httpx.get(f"{url}/metrics").text


# ---------------------------------------------------------------------------- bench serve


def test_bench_serve_sends_embedding_batches(base_url):
    specs = [RequestSpec(f"Sentence number {i} about shipping.", 0) for i in range(12)]
    batched = embedding_specs(specs, 4)
    assert [len(s.inputs) for s in batched] == [4, 4, 4]
    results, wall = asyncio.run(run_load(base_url, batched, endpoint="embeddings", concurrency=3))
    s = summarize(results, wall)
    assert s["completed"] == 3 and s["failed"] == 0 and not s["errors"]
    assert s["total_input_tokens"] > 12 * 5 and s["total_output_tokens"] == 0
    assert s["mean_e2el_ms"] > 0 and s["p99_e2el_ms"] >= s["median_e2el_ms"]
    assert s["mean_ttft_ms"] is None and s["request_throughput"] > 0
    with pytest.raises(InputError, match="--endpoint"):
        asyncio.run(run_load(base_url, batched, endpoint="rerank"))


def test_bench_serve_cli_embeddings_json(base_url, tmp_path, capsys):
    from lmstack.cli import main

    out = tmp_path / "emb.json"
    args = ["bench", "serve", "--url", base_url, "--endpoint", "embeddings", "--batch", "4"]
    args += ["--num-prompts", "3", "--concurrency", "2", "--input-len", "16", "--json", str(out)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    summary = json.loads(out.read_text())
    assert summary["completed"] == 3 and summary["endpoint"] == "embeddings"
    assert summary["batch"] == 4 and summary["request_throughput"] > 0
    assert "inputs/s" in capsys.readouterr().out
