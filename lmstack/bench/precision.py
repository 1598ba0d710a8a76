"""`lmstack bench precision`: fp32 vs bf16 vs int8 on memory, speed and perplexity.

Perplexity is measured on real text (by default the NIST SP 800-63-3 report shipped in
shared/data) in non-overlapping windows, so every dtype scores exactly the same tokens.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lmstack.errors import InputError

DTYPES = ("float32", "bfloat16", "int8")


def read_corpus(path: Path) -> str:
    if not path.exists():
        raise InputError(f"--text {path}: no such file or directory")
    files = sorted(path.glob("*.md")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"--text {path}: no .md files in the directory")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int) -> float:
    from lmstack.model.cache import NoCache

    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = torch.tensor(token_ids[start : start + window + 1])
        if len(chunk) < 2:
            break
        inputs, targets = chunk[:-1], chunk[1:]
        logits = model.compute_logits(model(inputs, torch.arange(len(inputs)), NoCache()))
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    return math.exp(nll / count)


def decode_speed(model, tokenizer, tokens: int = 64) -> float:
    from lmstack.model.generate import GenerationStats, generate_stream

    prompt = tokenizer.encode("The history of cryptography begins")
    list(generate_stream(model, tokenizer, prompt, 4, ignore_eos=True))  # warm-up
    stats = GenerationStats()
    list(generate_stream(model, tokenizer, prompt, tokens, ignore_eos=True, stats=stats))
    return stats.decode_tokens_per_s


def bench_precision(text_path: Path, max_tokens: int, window: int, dtypes=DTYPES) -> dict:
    from lmstack.model.llama import LlamaForCausalLM
    from lmstack.model.tokenizer import Tokenizer

    for name in dtypes:
        if name not in DTYPES:
            raise InputError(f"dtype {name!r}: choose from {', '.join(DTYPES)}")
    if window < 16:
        raise InputError(f"--window must be >= 16 tokens, got {window}")
    results = {}
    tokens = None
    for name in dtypes:
        start = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained("bundled", name)
        load_s = time.perf_counter() - start
        tokenizer = Tokenizer(model.source)
        if tokens is None:
            tokens = tokenizer.encode(read_corpus(text_path))[:max_tokens]
        results[name] = {
            "weights_gb": round(model.weight_bytes() / 1e9, 3),
            "load_s": round(load_s, 2),
            "decode_tokens_per_s": round(decode_speed(model, tokenizer), 1),
            "perplexity": round(perplexity(model, tokens, window), 3),
        }
        del model
    base = results.get("float32")
    if base:
        for row in results.values():
            row["perplexity_vs_fp32"] = round(row["perplexity"] / base["perplexity"], 4)
            row["memory_vs_fp32"] = round(row["weights_gb"] / base["weights_gb"], 3)
            row["speed_vs_fp32"] = round(
                row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2
            )
    return {
        "text": str(text_path),
        "tokens": len(tokens or []),
        "window": window,
        "dtypes": results,
    }
