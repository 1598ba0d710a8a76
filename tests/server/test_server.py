"""`lmstack serve` end to end: a real uvicorn server on 127.0.0.1 around the real engine.

The official openai client drives the happy paths; httpx drives errors, limits, metrics,
disconnects and shutdown. One engine serves the module; the queue-full test and the SIGTERM
test start their own (a small engine in-process, a `lmstack serve` subprocess).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import signal
import threading

import httpx
import jsonschema
import pytest
from helpers import live_server, serve_process, wait_for
from openai import OpenAI

from lmstack.server.app import create_app

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Say hello."}]
METRIC_NAMES = [
    "lmstack:time_to_first_token_seconds",
    "lmstack:inter_token_latency_seconds",
    "lmstack:e2e_request_latency_seconds",
    "lmstack:request_queue_time_seconds",
    "lmstack:num_requests_running",
    "lmstack:num_requests_waiting",
    "lmstack:kv_cache_usage_perc",
    "lmstack:prompt_tokens_total",
    "lmstack:generation_tokens_total",
    "lmstack:request_success_total",
    "lmstack:requests_rejected_total",
    "lmstack:request_timeouts_total",
    "lmstack:preemptions_total",
    "lmstack:prefix_cache_queries_total",
    "lmstack:prefix_cache_hits_total",
    "lmstack:memory_limit_bytes",  # the memory alert in deploy/ divides RSS by it
]


def scrape(http: httpx.Client) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, with the `model_name` label, which every lmstack
    series carries as vLLM's do, checked and left out of the keys."""
    text = http.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key.startswith("lmstack:"):
                label = f'model_name="{MODEL}"'
                assert label in key, key
                key = re.sub(r',?model_name="[^"]*"', "", key).replace("{,", "{")
                key = key.replace("{}", "")
            samples[key] = float(value)
    return samples


@pytest.fixture(scope="module")
def base_url(engine):
    with live_server(create_app(engine, MODEL, api_key=None, max_body_bytes=1_000_000)) as url:
        yield url


# ---------------------------------------------------------------------------- OpenAI client


def test_chat_completion(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.model == MODEL and r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    prompt = engine.tokenizer.apply_chat_template(HELLO)
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_arrives_in_chunks_and_ends_with_usage(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(
        **kwargs,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 3, pieces
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.id == chunks[0].id for c in chunks)


def test_completion(client, engine):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_json_schema_response_format_parses_and_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the largest city of France as JSON."}],
        max_tokens=48,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema},
        },
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_n_choices_are_distinct_and_seeded(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0)
    two = client.completions.create(**kwargs, n=2, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 16 or any(c.finish_reason == "stop" for c in two.choices)
    # Choice i is sampled with seed + i: the choices differ, and the request reproduces.
    # (Comparing with a lone seed=8 request would not do: bf16 logits depend on the batch.)
    assert two.choices[0].text != two.choices[1].text
    again = client.completions.create(**kwargs, n=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    chat = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=4, n=2, seed=1, temperature=1.0
    )
    assert [c.index for c in chat.choices] == [0, 1]


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert entry.logprob == pytest.approx(top[0])  # greedy picks the most likely token


def test_completion_logprobs(client):
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_stop_strings_and_extensions(client, http):
    r = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[","]
    )
    assert r.choices[0].finish_reason == "stop" and "," not in r.choices[0].text
    # priority, timeout, top_k, min_p, repetition_penalty and ignore_eos go to the engine.
    extra = {"priority": 1, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    r = client.completions.create(
        model=MODEL,
        prompt="Once",
        max_tokens=400,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={**extra, "timeout": 0.5, "ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "timeout"
    assert r.usage.completion_tokens < 400
    assert scrape(http)["lmstack:request_timeouts_total"] >= 1


# ---------------------------------------------------------------------------- errors


def _invalid_utf8() -> bytes:
    return b'{"prompt": "caf\xe9", "max_tokens": 2}'


ERRORS = [
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', 400, "not valid JSON"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": [1]}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "gpt-4o"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens must be >= 1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "8192 .--max-output-tokens"),
    ("/v1/completions", _invalid_utf8(), 400, "UTF-8"),
    ("/v1/completions", {"prompt": [17] * 9000}, 400, "9000 tokens.*8192"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n must be in"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "seed must be in"),
    (
        "/v1/chat/completions",
        {
            "messages": HELLO,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}},
        },
        400,
        "does not compile",
    ),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400, "requires logprobs"),
]


@pytest.mark.parametrize("path, body, status, message", ERRORS)
def test_bad_requests_get_a_clear_4xx(http, path, body, status, message):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(message, error["message"]), error["message"]


def test_oversized_bodies_get_413(http):
    huge = b'{"prompt": "' + b"a" * 10_000_000 + b'"}'
    r = http.post("/v1/completions", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1000000 bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the server must count what arrives
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"a" * 100_000

    r = http.post(
        "/v1/completions", content=chunked(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_server_keeps_serving_after_errors(http):
    for path, body, _, _ in ERRORS[:4]:
        http.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    # null means "not set", as in OpenAI's API.
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": None, "n": None}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_api_key_is_required_when_set(engine):
    app = create_app(engine, MODEL, api_key="s3cret", max_body_bytes=1_000_000)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/v1/models").status_code == 401
        bad = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200  # probes need no key
        good = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]
        r = good.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert r.choices[0].text is not None


# ---------------------------------------------------------------------------- operations


def test_health_ready_models(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 8192


def test_metrics_count_requests(http):
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200
    text = http.get("/metrics").text
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    samples = scrape(http)
    assert samples['lmstack:request_success_total{finished_reason="length"}'] >= 1
    assert samples["lmstack:prompt_tokens_total"] > 0
    assert samples["lmstack:generation_tokens_total"] >= 3
    assert samples["lmstack:time_to_first_token_seconds_count"] >= 1
    assert samples["lmstack:e2e_request_latency_seconds_count"] >= 1
    assert samples["lmstack:inter_token_latency_seconds_count"] >= 1
    assert samples["lmstack:num_requests_running"] == 0
    assert samples["lmstack:memory_limit_bytes"] > 1e8


def test_one_json_log_line_per_request(http, caplog):
    caplog.set_level(logging.INFO, logger="lmstack.server")
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
    request_id = r.json()["id"]

    def logged():
        lines = [json.loads(rec.getMessage()) for rec in caplog.records if request_id in rec.msg]
        return lines

    assert wait_for(logged, 5)
    (line,) = logged()
    assert line["status"] == 200 and line["output_tokens"] == 2 and line["prompt_tokens"] >= 1
    assert line["finish_reason"] == "length" and line["ttft_s"] >= 0 and line["latency_s"] > 0
    assert line["queue_time_s"] is not None


@pytest.mark.slow
def test_client_disconnect_aborts_the_request(http, base_url):
    body = {"prompt": "Tell a long story.", "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data:")) >= 3
    # Leaving the block closed the connection mid-stream.
    assert wait_for(lambda: scrape(http)["lmstack:num_requests_running"] == 0, 10)
    assert scrape(http)['lmstack:request_success_total{finished_reason="abort"}'] >= 1

    # Non-streaming: a client that gives up waiting aborts too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert wait_for(lambda: scrape(http)["lmstack:num_requests_running"] == 0, 10)
    assert scrape(http)["lmstack:num_requests_waiting"] == 0


@pytest.mark.slow
def test_full_queue_gets_429_with_retry_after():
    from lmstack.engine.async_engine import AsyncLLMEngine

    small = AsyncLLMEngine(num_kv_tokens=2048, max_num_seqs=1, max_waiting=1)
    try:
        app = create_app(small, MODEL, max_body_bytes=1_000_000)
        with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            body = {"prompt": "Count to ten:", "max_tokens": 16, "ignore_eos": True}
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                responses = list(
                    pool.map(lambda _: http.post("/v1/completions", json=body), range(6))
                )
            refused = [r for r in responses if r.status_code == 429]
            assert refused and any(r.status_code == 200 for r in responses)
            assert all(r.status_code in (200, 429) for r in responses)
            assert int(refused[0].headers["Retry-After"]) >= 1
            assert "queue is full" in refused[0].json()["error"]["message"]
            samples = scrape(http)
            assert samples['lmstack:requests_rejected_total{reason="queue_full"}'] == len(refused)
            again = http.post("/v1/completions", json={**body, "max_tokens": 2})
            assert again.status_code == 200
    finally:
        small.shutdown()


@pytest.mark.slow
def test_sigterm_drains_running_requests_then_exits_zero(tmp_path):
    log = open(tmp_path / "stderr.log", "w+")  # noqa: SIM115  (read back after exit)
    proc, url = serve_process(["--kv-cache-gb", "0.05", "--drain-timeout", "60"], log)
    try:
        lines: list[str] = []
        body = {"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": True}

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                lines.extend(r.iter_lines())

        thread = threading.Thread(target=stream)
        thread.start()
        assert wait_for(lambda: any('"text"' in line for line in lines), 60, 0.02)
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, 5, 0.05)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        thread.join(timeout=120)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        log.seek(0)
        records = [json.loads(line) for line in log if line.startswith('{"event": "request"')]
        assert any(r["path"] == "/v1/completions" and r["output_tokens"] == 48 for r in records)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
