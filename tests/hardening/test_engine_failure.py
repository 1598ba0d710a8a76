"""A failed engine is visible, and one failing request fails alone (issue 17, point 7).

Real engines and a real uvicorn server throughout. Faults are injected by wrapping methods
of the real objects (the engine's model runner, sampler, grammar compiler, scheduler, stats)
on engines built for these tests, never on a shared one: a poisoned request is marked with
`SamplingParams.extra["poison"]`, and the wrapped method raises when it meets that request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from helpers import live_server, wait_for

from lmstack.engine.async_engine import MAX_FAILED_STEPS, AsyncLLMEngine
from lmstack.engine.sampling_params import SamplingParams, StructuredOutput
from lmstack.errors import EngineDeadError
from lmstack.server.app import create_app

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at"]


def _params(poison: bool = False, max_tokens: int = 8, **kw) -> SamplingParams:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
    sp.extra["poison"] = poison
    return sp


def _poisoned(seqs) -> bool:
    return any(s.params.extra.get("poison") for s in seqs)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(num_kv_tokens=4096)
    yield eng
    eng.shutdown()


async def _collect(eng: AsyncLLMEngine, request_id, queue):
    final = None
    async for out in eng.stream(request_id, queue):
        final = out
    return final


async def _batch_with_one_poisoned(eng: AsyncLLMEngine, params: list[SamplingParams]):
    """A long blocker runs first; the four requests are added in one burst while it steps,
    so the step thread drains them together and they share a batch."""
    blocker_id, blocker_q = eng.add_request("Count from one to fifty:", _params(max_tokens=24))
    first = await blocker_q.get()  # the blocker is running: the next drain takes all four
    handles = [eng.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    results = await asyncio.gather(*(_collect(eng, rid, q) for rid, q in handles))
    rest = await _collect(eng, blocker_id, blocker_q)
    blocker = rest if rest is not None else first
    return results, blocker


def _assert_three_complete_one_failed(results, blocker, poisoned: int, cause: str):
    for i, out in enumerate(results):
        if i == poisoned:
            assert out.finish_reason == "error", out
            assert cause in out.error and "injected" in out.error, out.error
        else:
            assert out.error is None, out.error
            assert out.finish_reason == "length" and len(out.token_ids) == 8, out
    assert blocker.finish_reason == "length" and blocker.error is None


def test_a_forward_that_fails_for_one_request_fails_it_alone(engine, monkeypatch):
    runner = engine.engine.runner
    real = runner.execute
    batches_that_raised: list[int] = []

    def execute(batch, blocks):
        if _poisoned(item.seq for item in batch):
            batches_that_raised.append(len(batch))
            raise RuntimeError("injected forward fault")
        return real(batch, blocks)

    monkeypatch.setattr(runner, "execute", execute)
    params = [_params(poison=(i == 2)) for i in range(4)]
    results, blocker = asyncio.run(_batch_with_one_poisoned(engine, params))
    _assert_three_complete_one_failed(results, blocker, 2, "the model forward failed")
    # The poisoned request really shared a batch (the retry path ran), then failed alone.
    assert max(batches_that_raised) > 1 and batches_that_raised[-1] == 1
    assert engine.is_alive and engine.failed_steps == 0


def test_a_sampling_fault_in_one_row_fails_only_that_request(engine, monkeypatch):
    sampler = engine.engine.sampler
    real = sampler._uniforms

    def uniforms(seqs):
        if _poisoned(seqs):
            raise ValueError("injected sampling fault")
        return real(seqs)

    monkeypatch.setattr(sampler, "_uniforms", uniforms)
    # _uniforms runs for sampled (temperature > 0) rows only; seeded, so they stay stable.
    params = [_params(poison=(i == 0)) for i in range(4)]
    for sp in params:
        sp.temperature, sp.seed = 0.8, 7
    results, blocker = asyncio.run(_batch_with_one_poisoned(engine, params))
    _assert_three_complete_one_failed(results, blocker, 0, "sampling failed")
    assert engine.is_alive


def test_a_grammar_mask_fault_fails_only_its_request(engine, monkeypatch):
    compiler = engine.engine.grammar
    real = compiler.matcher

    def matcher(structured):
        m = real(structured)
        if structured.regex == "[a-z]+!":  # the poisoned request's grammar

            def fill_bitmask(bitmask, row):
                raise RuntimeError("injected grammar fault")

            m.fill_bitmask = fill_bitmask
        return m

    monkeypatch.setattr(compiler, "matcher", matcher)
    params = []
    for i in range(4):
        sp = _params(structured=StructuredOutput(regex="[a-z]+!" if i == 3 else "[a-z ]+"))
        sp.ignore_eos = False
        params.append(sp)
    results, blocker = asyncio.run(_batch_with_one_poisoned(engine, params))
    assert results[3].finish_reason == "error" and "injected grammar fault" in results[3].error
    assert "sampling failed" in results[3].error
    for out in results[:3]:
        assert out.error is None and out.finish_reason in ("stop", "length"), out
        assert out.text and set(out.text) <= set("abcdefghijklmnopqrstuvwxyz "), out.text
    assert blocker.error is None and engine.is_alive


def test_steps_that_keep_failing_declare_the_engine_dead():
    eng = AsyncLLMEngine(num_kv_tokens=1024)
    try:
        scheduler = eng.engine.scheduler

        def schedule(now=None):
            raise RuntimeError("injected scheduler fault")

        scheduler.schedule = schedule

        async def run():
            errors = []
            for _ in range(MAX_FAILED_STEPS):
                out = await _collect(eng, *eng.add_request("Hello", _params()))
                errors.append(out.error)
            return errors

        errors = asyncio.run(run())
        assert all(e and "injected scheduler fault" in e for e in errors), errors
        assert wait_for(lambda: not eng.is_alive, 2)
        assert "3 steps in a row failed" in eng.dead and "injected" in eng.dead

        async def late():
            eng.add_request("Hello", _params())

        with pytest.raises(EngineDeadError, match="cannot generate until it is restarted"):
            asyncio.run(late())
    finally:
        eng.shutdown()


def test_a_dead_step_thread_is_503_at_once_and_fails_requests_in_flight():
    eng = AsyncLLMEngine(num_kv_tokens=2048)
    try:
        with live_server(create_app(eng, MODEL)) as url, httpx.Client(base_url=url) as http:
            assert http.get("/ready").status_code == 200
            body = {
                "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
            events: list = []
            started = threading.Event()

            def stream():
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            events.append(json.loads(line[6:]))
                            if len(events) >= 3:
                                started.set()

            reader = threading.Thread(target=stream)
            reader.start()
            plain: list = []  # a request in flight without streaming: answered 503 too
            waiter = threading.Thread(
                target=lambda: plain.append(
                    httpx.post(
                        f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=60
                    )
                )
            )
            waiter.start()
            assert started.wait(60), events

            def stats():  # a fault in the loop's own bookkeeping, outside any step
                raise RuntimeError("injected stats fault")

            eng.engine.stats = stats
            t0 = time.monotonic()
            assert wait_for(lambda: http.get("/ready").status_code == 503, 1.0, 0.02)
            chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            refused = http.post("/v1/chat/completions", json=chat, timeout=5)
            assert time.monotonic() - t0 < 1.5
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "engine_dead" and error["type"] == "server_error"
            assert "injected stats fault" in error["message"]
            assert http.get("/health").status_code == 503
            # The request that was streaming ends with the error instead of hanging.
            reader.join(10)
            assert not reader.is_alive()
            messages = [e["error"]["message"] for e in events if "error" in e]
            assert messages and "step thread stopped" in messages[0], events[-3:]
            finishes = [c["finish_reason"] for e in events for c in e.get("choices", [])]
            assert finishes[-1] == "error"
            waiter.join(10)
            assert plain and plain[0].status_code == 503, plain and plain[0].text
            assert plain[0].json()["error"]["code"] == "engine_dead"
    finally:
        eng.shutdown()
