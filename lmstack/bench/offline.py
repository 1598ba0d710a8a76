"""`lmstack bench offline`: the engine against the baseline a user starts from, same run.

Baselines (Hugging Face transformers, loaded the documented way from the same dequantized
weights, `AutoModelForCausalLM.from_pretrained(dir, dtype=...)`):
  hf        generate(), float32, one request at a time
  hf-bf16   generate(), bfloat16, one request at a time
  hf-batch  generate() on static left-padded batches of up to 32 in bfloat16; a batch runs
            until its longest member is done, and only the tokens each request asked for
            count as output.
"""

from __future__ import annotations

import random
import resource
import time
from dataclasses import dataclass

from lmstack.errors import InputError
from lmstack.model.llama import resolve_dtype

BASELINES = ("hf", "hf-bf16", "hf-batch", "none")


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def parse_output_len(spec: str) -> tuple[int, int]:
    try:
        low, _, high = spec.partition(":")
        low_n = int(low)
        high_n = int(high) if high else low_n
    except ValueError:
        raise InputError(f"--output-len must be N or A:B, got {spec!r}") from None
    if low_n < 1 or high_n < low_n:
        raise InputError(f"--output-len {spec!r}: need 1 <= A <= B")
    return low_n, high_n


def make_workload(
    tokenizer, num_requests: int, input_len: int, output_len: str, seed: int
) -> Workload:
    """Random prompts of exactly `input_len` ordinary tokens (no special tokens)."""
    if num_requests < 1:
        raise InputError(f"--requests must be >= 1, got {num_requests}")
    if input_len < 1:
        raise InputError(f"--input-len must be >= 1, got {input_len}")
    low, high = parse_output_len(output_len)
    rng = random.Random(seed)
    special = tokenizer.special_token_ids
    vocab = [t for t in range(tokenizer.vocab_size) if t not in special]
    prompts = [[rng.choice(vocab) for _ in range(input_len)] for _ in range(num_requests)]
    lens = [rng.randint(low, high) for _ in range(num_requests)]
    return Workload(prompts, lens)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_engine(workload: Workload, **engine_options) -> dict:
    from lmstack.engine.llm_engine import LLMEngine
    from lmstack.engine.sampling_params import SamplingParams

    engine = LLMEngine(**engine_options)
    # Warm-up: one tiny request so one-time costs (allocator, kernels) are not timed.
    engine.add_request(workload.prompts[0][:8], SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    for prompt, n in zip(workload.prompts, workload.output_lens):
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    produced, ttfts, steps, peak_kv = 0, [], 0, 0.0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                produced += len(out.token_ids)
                ttfts.append(out.ttft or 0.0)
        steps += 1
        peak_kv = max(peak_kv, engine.block_manager.usage)
    wall = time.perf_counter() - start
    return {
        "output_tokens": produced,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(produced / wall, 2),
        "mean_ttft_s": round(sum(ttfts) / len(ttfts), 3),
        "steps": steps,
        "kv_cache_gb": round(engine.runner.kv_cache_bytes / 1e9, 3),
        "peak_kv_usage": round(peak_kv, 3),
        "preemptions": engine.scheduler.num_preemptions,
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }


def load_hf(dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    from lmstack.model.weights import resolve_model

    dtype = torch.float32 if dtype_name == "float32" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(str(resolve_model("bundled")), dtype=dtype).eval()


def run_hf(workload: Workload, baseline: str, batch_size: int = 32) -> dict:
    import torch

    model = load_hf("float32" if baseline == "hf" else "bfloat16")
    batched = baseline == "hf-batch"
    size = batch_size if batched else 1
    pad = model.config.pad_token_id or 0
    with torch.inference_mode():
        model.generate(torch.tensor([workload.prompts[0][:8]]), max_new_tokens=2, pad_token_id=pad)
        start = time.perf_counter()
        for i in range(0, len(workload.prompts), size):
            prompts = workload.prompts[i : i + size]
            lens = workload.output_lens[i : i + size]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, p in enumerate(prompts):  # left padding, as decoder-only batching needs
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            longest = max(lens)
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=pad,
            )
        wall = time.perf_counter() - start
    return {
        "output_tokens": workload.output_tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(workload.output_tokens / wall, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }


def bench_offline(
    num_requests: int,
    input_len: int,
    output_len: str,
    seed: int,
    baseline: str,
    engine_options: dict,
) -> dict:
    if baseline not in BASELINES:
        raise InputError(f"--baseline {baseline!r}: choose one of {', '.join(BASELINES)}")
    from lmstack.model.tokenizer import Tokenizer
    from lmstack.model.weights import resolve_model

    tokenizer = Tokenizer(resolve_model(engine_options.get("model", "bundled")))
    workload = make_workload(tokenizer, num_requests, input_len, output_len, seed)
    result = {
        "workload": {
            "requests": num_requests,
            "input_len": input_len,
            "output_len": output_len,
            "output_tokens": workload.output_tokens,
            "seed": seed,
        },
        "engine": {
            "dtype": resolve_dtype(engine_options.get("dtype"), engine_options.get("model"))[0],
            **run_engine(workload, **engine_options),
        },
    }
    if baseline != "none":
        result["baseline"] = {"name": baseline, **run_hf(workload, baseline)}
        result["speedup"] = round(
            result["engine"]["output_tokens_per_s"] / result["baseline"]["output_tokens_per_s"], 2
        )
    return result
