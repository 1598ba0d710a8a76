"""`lmstack bench precision`: every precision against fp32 on memory, speed, perplexity
and greedy agreement (the share of greedy next-token choices, over the scored text, that
match the fp32 dequantized model's).

Perplexity is measured on real text (by default the NIST SP 800-63-3 report in
lmstack/data) in non-overlapping windows, so every dtype scores exactly the same tokens.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lmstack.errors import InputError

DTYPES = ("float32", "bfloat16", "int8", "gguf", "q4_1", "q4_0", "q8_0")


def read_corpus(path: Path) -> str:
    if not path.exists():
        raise InputError(f"--text {path}: no such file or directory")
    files = sorted(path.glob("*.md")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"--text {path}: no .md files in the directory")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


@torch.inference_mode()
def score(model, token_ids: list[int], window: int) -> tuple[float, torch.Tensor]:
    """(perplexity, the greedy next token at every scored position)."""
    from lmstack.model.cache import NoCache

    nll, count, greedy = 0.0, 0, []
    for start in range(0, len(token_ids) - 1, window):
        chunk = torch.tensor(token_ids[start : start + window + 1])
        if len(chunk) < 2:
            break
        inputs, targets = chunk[:-1], chunk[1:]
        logits = model.compute_logits(model(inputs, torch.arange(len(inputs)), NoCache()))
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
        greedy.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(greedy)


def perplexity(model, token_ids: list[int], window: int) -> float:
    return score(model, token_ids, window)[0]


def decode_speed(model, tokenizer, tokens: int = 64) -> float:
    from lmstack.bench.naive import GenerationStats, generate_stream

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
    results, greedy = {}, {}
    tokens = None
    if "float32" not in dtypes:
        dtypes = ["float32", *dtypes]  # the reference every row is compared with
    for name in dtypes:
        start = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained("bundled", name)
        load_s = time.perf_counter() - start
        tokenizer = Tokenizer(model.source)
        if tokens is None:
            tokens = tokenizer.encode(read_corpus(text_path))[:max_tokens]
        ppl, greedy[name] = score(model, tokens, window)
        results[name] = {
            "weights_gb": round(model.weight_bytes() / 1e9, 3),
            "load_s": round(load_s, 2),
            "decode_tokens_per_s": round(decode_speed(model, tokenizer), 1),
            "perplexity": round(ppl, 3),
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
        for name, row in results.items():
            same = (greedy[name] == greedy["float32"]).float().mean().item()
            row["greedy_agreement_vs_fp32"] = round(same, 4)
    from lmstack.cpu import describe

    return {
        "cpu": describe(),
        "text": str(text_path),
        "tokens": len(tokens or []),
        "window": window,
        "dtypes": results,
    }
