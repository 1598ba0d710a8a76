"""The engine end to end on the real model: batching equals running alone, prefix cache,
preemption and chunked prefill change nothing, request management works."""

from __future__ import annotations

import asyncio
import json
import time

import jsonschema
import pytest
import torch

from lmstack.bench.naive import generate_stream
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.sampling_params import SamplingParams, StructuredOutput
from lmstack.engine.scheduler import QueueFullError
from lmstack.errors import InputError

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village, there lived an old",
    "Photosynthesis is",
    "List three colours:",
    "In 1969, the first humans",
    "The quick brown fox",
    "Water boils at",
    "A haiku about the sea:\n",
    "import numpy as np\n\nx =",
    "Dear hiring manager, I am writing to apply for the position of",
    "The three laws of thermodynamics are",
    "Q: What is the largest planet?\nA:",
    "Roses are red,",
    "The best way to learn a language is",
    "SELECT name FROM users WHERE",
]

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def run(engine: LLMEngine, requests: list[tuple], max_steps: int = 10_000) -> dict:
    """Submit (prompt, params, kwargs) tuples and step until done: request_id -> final output."""
    ids = [engine.add_request(p, sp, **kw) for p, sp, kw in requests]
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return {rid: done.get(rid) for rid in ids}


@pytest.fixture(scope="module")
def engine(model):
    return LLMEngine(dtype="float32", max_num_batched_tokens=256, num_kv_tokens=8192)


@pytest.fixture(scope="module")
def alone(model):
    """Greedy continuations of each prompt run alone through the single-sequence decoder."""
    net, tok = model
    return [
        list(generate_stream(net, tok, tok.encode(p), 12, temperature=0.0, ignore_eos=True))
        for p in PROMPTS
    ]


def test_concurrent_greedy_equals_running_alone(engine, alone):
    outs = run(engine, [(p, GREEDY, {}) for p in PROMPTS])
    got = [o.token_ids for o in outs.values()]
    assert got == alone
    assert all(o.finish_reason == "length" for o in outs.values())


def test_chunked_prefill_gives_the_same_tokens(model, alone):
    small = LLMEngine(dtype="float32", max_num_batched_tokens=5, num_kv_tokens=4096)
    outs = run(small, [(p, GREEDY, {}) for p in PROMPTS[:6]])
    assert [o.token_ids for o in outs.values()] == alone[:6]


def test_prefix_cache_hit_gives_the_same_tokens(engine, model):
    net, tok = model
    system = "You are a careful assistant. Answer in one short sentence. " * 4
    prompts = [system + q for q in ("What is rain?", "What is snow?")]
    first = run(engine, [(prompts[0], GREEDY, {})])
    hits_before = engine.block_manager.prefix_cache_hits
    second = run(engine, [(prompts[1], GREEDY, {})])
    out = next(iter(second.values()))
    assert out.num_cached_tokens >= 32
    assert engine.block_manager.prefix_cache_hits > hits_before
    ref = list(
        generate_stream(net, tok, tok.encode(prompts[1]), 12, temperature=0.0, ignore_eos=True)
    )
    assert out.token_ids == ref
    assert next(iter(first.values())).token_ids


def test_preempted_sequences_resume_with_the_same_tokens(model, alone):
    # 8 blocks of 16 tokens cannot hold 6 growing sequences: some are preempted and recomputed.
    tight = LLMEngine(dtype="float32", num_kv_tokens=128, block_size=16, max_num_batched_tokens=64)
    outs = run(tight, [(p, GREEDY, {}) for p in PROMPTS[:6]])
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs.values()] == alone[:6]
    assert tight.block_manager.usage == 0.0


def test_seeded_sampling_is_independent_of_the_batch(engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234)
    solo = run(engine, [(PROMPTS[0], params, {})])
    crowd = run(
        engine,
        [(p, SamplingParams(max_tokens=10, temperature=1.0), {}) for p in PROMPTS[1:5]]
        + [(PROMPTS[0], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234), {})],
    )
    assert list(solo.values())[0].token_ids == list(crowd.values())[-1].token_ids


def test_stop_strings_and_logprobs(engine):
    params = SamplingParams(max_tokens=30, temperature=0, stop=["\n"], logprobs=3)
    out = next(iter(run(engine, [("Roses are red,", params, {})]).values()))
    assert out.finish_reason == "stop" and "\n" not in out.text and out.text
    assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in out.new_logprobs or [])


def test_priority_is_served_first(model):
    one = LLMEngine(dtype="float32", max_num_seqs=1, num_kv_tokens=2048)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    low = [one.add_request(p, params, priority=5) for p in PROMPTS[:3]]
    high = one.add_request(PROMPTS[3], params, priority=0)
    order = []
    while one.has_unfinished_requests():
        order += [o.request_id for o in one.step() if o.finished]
    # Nothing runs before the first step(), so the later high-priority request goes first,
    # then the low-priority ones in arrival order.
    assert order == [high, *low]


def test_timeouts_queued_and_running(model):
    eng = LLMEngine(dtype="float32", max_num_seqs=1, num_kv_tokens=2048)
    running = eng.add_request(
        PROMPTS[0], SamplingParams(max_tokens=500, ignore_eos=True), timeout=0.5
    )
    queued = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=5), timeout=0.2)
    finished = {}
    start = time.monotonic()
    while eng.has_unfinished_requests() and time.monotonic() - start < 30:
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[queued].finish_reason == "timeout" and finished[queued].token_ids == []
    assert finished[running].finish_reason == "timeout"
    assert 0 < len(finished[running].token_ids) < 500 and finished[running].text
    assert eng.block_manager.usage == 0.0


def test_queue_bound_and_abort(model):
    eng = LLMEngine(dtype="float32", max_num_seqs=2, max_waiting=3, num_kv_tokens=2048)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    ids = [eng.add_request(PROMPTS[i], params) for i in range(3)]
    with pytest.raises(QueueFullError, match="3"):
        eng.add_request(PROMPTS[3], params)
    eng.step()  # two start running, one waits
    assert eng.abort(ids[0]) and eng.abort(ids[2]) and not eng.abort("nope")
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
    assert outs[ids[0]].finish_reason == outs[ids[2]].finish_reason == "abort"
    assert outs[ids[1]].finish_reason == "length" and len(outs[ids[1]].token_ids) == 50
    assert eng.block_manager.usage == 0.0


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(temperature=-0.5), "temperature must be >= 0"),
        (SamplingParams(top_p=1.5), "top_p must be in (0, 1]"),
        (SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        (SamplingParams(max_tokens=9000), "exceeds the context window of 8192"),
        (SamplingParams(stop=[3]), "stop must be a string or a list"),
        (
            SamplingParams(structured=StructuredOutput(json_schema={"type": "nonsense"})),
            "json_schema",
        ),
    ],
)
def test_invalid_requests_are_rejected_before_the_loop(engine, params, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("]", r"\]")):
        engine.add_request("hello", params)
    assert not engine.has_unfinished_requests()


def test_prompt_beyond_context_names_both_numbers(engine):
    with pytest.raises(InputError, match="9000 tokens.*8192"):
        engine.add_request([5] * 9000, SamplingParams(max_tokens=1))


def test_async_engine_streams_and_aborts_on_close(model):
    from lmstack.engine.async_engine import AsyncLLMEngine

    eng = AsyncLLMEngine(dtype="float32", num_kv_tokens=2048)

    async def main():
        chunks = []
        async for out in eng.generate(PROMPTS[0], GREEDY):
            chunks.append(out.new_text)
        stream = eng.generate(PROMPTS[1], SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        return chunks

    try:
        chunks = asyncio.run(main())
        assert len(chunks) > 1 and "Paris" in "".join(chunks)
        deadline = time.monotonic() + 5
        while eng.stats()["num_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.stats()["num_running"] == 0
    finally:
        eng.shutdown()


def test_async_engine_steps_on_the_thread_that_owns_the_cores(model, tmp_path):
    from lmstack.engine.async_engine import AsyncLLMEngine
    from lmstack.errors import LmstackError

    before = torch.get_num_threads()
    eng = AsyncLLMEngine(dtype="float32", num_kv_tokens=2048, exclusive_threads=True)
    try:
        # The step thread keeps the process's thread count; every other thread now starts
        # single-threaded, so no second OpenMP team can make libgomp put workers to sleep.
        assert eng.step_threads == before
        assert torch.get_num_threads() == 1

        async def main():
            return [o.new_text async for o in eng.generate(PROMPTS[0], GREEDY)]

        assert "Paris" in "".join(asyncio.run(main()))
    finally:
        eng.shutdown()
        torch.set_num_threads(before)
    # A model that cannot load fails the constructor, on the caller's thread.
    with pytest.raises(LmstackError, match="nope"):
        AsyncLLMEngine(model=str(tmp_path / "nope"), num_kv_tokens=2048)


SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}
        },
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "currency": {"enum": ["USD", "EUR"]},
        },
        "required": ["price", "currency"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        },
        "required": ["city", "country"],
    },
    {
        "type": "object",
        "properties": {
            "x": {"type": "integer", "minimum": 0, "maximum": 9},
            "y": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["x", "y"],
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "genre": {"enum": ["drama", "comedy", "horror"]},
        },
        "required": ["title", "year", "genre"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["id"],
                },
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["answer", "confidence"],
    },
]


def strict(schema: dict) -> dict:
    """OpenAI strict-mode style: objects admit only their declared properties."""
    if schema.get("type") == "object":
        schema = {**schema, "additionalProperties": False}
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    if schema.get("type") == "array":
        schema = {**schema, "items": strict(schema["items"])}
    return schema


@pytest.mark.slow
def test_structured_output_always_validates():
    eng = LLMEngine(max_num_seqs=50, num_kv_tokens=32768)
    requests = []
    for i in range(100):
        schema = strict(SCHEMAS[i % 10])
        prompt = eng.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Reply with JSON for this schema: {json.dumps(schema)}"}]
        )
        params = SamplingParams(
            max_tokens=200,
            temperature=0.8,
            seed=i,
            structured=StructuredOutput(json_schema=schema),
        )
        requests.append((prompt, params, {}))
    outs = run(eng, requests)
    for (_, params, _), out in zip(requests, outs.values()):
        assert out.finish_reason == "stop", (out.finish_reason, out.text, out.error)
        jsonschema.validate(json.loads(out.text), params.structured.json_schema)


TEXT_OR_CALL = (  # free text that never writes "<call>", or text then one call
    "start: TEXT | head CALL\n"
    'head[lazy]: TEXT "<call>"\n'
    "TEXT: /(.|\\n)*/ & ~/(.|\\n)*<call>(.|\\n)*/\n"
    "CALL: /[0-9]{1,4}<\\/call>/\n"
)


def test_greedy_rows_under_a_grammar_skip_masks_without_changing_a_token(engine):
    constraints = [
        StructuredOutput(json_schema=strict(SCHEMAS[0])),
        StructuredOutput(regex=r"(yes|no), because [a-z ]{1,40}\."),
        StructuredOutput(choice=["Paris", "London", "Berlin"]),
        StructuredOutput(grammar=TEXT_OR_CALL),
        StructuredOutput(json_object=True),
    ]
    ask = "Answer briefly: what is the capital of France? Reply as the format asks."
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": ask}])
    requests = [(prompt, SamplingParams(max_tokens=40, temperature=0.0, structured=c), {})
                for c in constraints]  # fmt: skip
    # A seeded sampled row beside them keeps its mask first: its draws must not change.
    sampled = SamplingParams(max_tokens=40, temperature=0.9, seed=7, structured=constraints[0])
    requests.append((prompt, sampled, {}))

    def outputs(greedy_first: bool) -> tuple[list, int, int]:
        engine.greedy_grammar_first = greedy_first
        rows, masks = engine.num_grammar_rows, engine.num_grammar_masks
        try:
            outs = run(engine, requests)
        finally:
            engine.greedy_grammar_first = True
        tokens = [(o.token_ids, o.finish_reason, o.error) for o in outs.values()]
        return tokens, engine.num_grammar_rows - rows, engine.num_grammar_masks - masks

    reference, ref_rows, ref_masks = outputs(False)
    got, rows, masks = outputs(True)
    assert got == reference
    assert all(error is None for _, _, error in got)
    assert ref_masks == ref_rows == rows  # the reference computes every row's mask
    sampled_rows = len(got[-1][0])  # one mask per sampled token, as before
    # The greedy rows mostly choose what their grammar allows; the rest still got masks.
    assert sampled_rows < masks < 0.6 * rows, (masks, rows)


def test_bad_request_mid_flight_does_not_disturb_the_batch(engine, alone):
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS[:4]]
    engine.step()
    with pytest.raises(InputError, match="top_p"):
        engine.add_request("hello", SamplingParams(top_p=0))
    with pytest.raises(InputError, match="prompt token ids"):
        engine.add_request([1, -5, 3], GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[i].token_ids for i in ids] == alone[:4]


def test_offline_llm_generate_keeps_prompt_order(model, alone):
    from lmstack import LLM
    from lmstack import SamplingParams as ExportedParams

    assert ExportedParams is SamplingParams
    llm = LLM("bundled", dtype="float32", num_kv_tokens=4096)
    outs = llm.generate(PROMPTS[:5], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone[:5]
    assert all(o.finished and o.text for o in outs)


def test_default_precision_output_does_not_depend_on_chunking_cache_or_batch():
    # At --dtype auto (gguf; on AVX512-BF16 CPUs with a bf16 copy for steps that hold prompt
    # tokens) a request's greedy tokens are the same alone, in a batch that arrives
    # together, prefilled in small chunks and after a prefix-cache hit.
    system = "You are a careful assistant. Answer in one short sentence. " * 4
    prompts = [system + q for q in ("What is rain?", "What is snow?", "Why is the sky blue?")]
    big = LLMEngine(num_kv_tokens=8192)
    from lmstack.kernels import qops

    assert big.model.dtype_name == ("gguf" if qops.linear_q_supported() else "float32")
    alone = [next(iter(run(big, [(p, GREEDY, {})]).values())).token_ids for p in prompts]
    again = next(iter(run(big, [(prompts[0], GREEDY, {})]).values()))  # a prefix-cache hit
    assert again.num_cached_tokens >= 32 and again.token_ids == alone[0]
    batch = run(big, [(p, GREEDY, {}) for p in reversed(prompts)])
    assert [o.token_ids for o in batch.values()][::-1] == alone
    small = LLMEngine(max_num_batched_tokens=7, num_kv_tokens=4096, enable_prefix_caching=False)
    chunked = run(small, [(p, GREEDY, {}) for p in prompts])
    assert [o.token_ids for o in chunked.values()] == alone
