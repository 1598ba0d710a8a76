"""`lmstack bench serve`: datasets, statistics, goodput, tables and plots for a serving run."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.bench.loadgen import RequestResult, RequestSpec
from lmstack.errors import InputError

PERCENTILES = (50, 90, 99)


def random_dataset(tokenizer, n: int, input_len: int, output_len: int, seed: int):
    """Prompts of ~input_len random ordinary tokens: every prompt is fresh, so no prefix
    cache can help (the worst case for TTFT)."""
    if input_len < 1 or output_len < 1 or n < 1:
        raise InputError("--num-prompts, --input-len and --output-len must be >= 1")
    rng = random.Random(seed)
    special = tokenizer.special_token_ids
    vocab = [t for t in range(min(tokenizer.vocab_size, 32000)) if t not in special]
    specs = []
    for _ in range(n):
        ids = [rng.choice(vocab) for _ in range(input_len)]
        specs.append(RequestSpec(tokenizer.decode(ids), output_len, input_len))
    return specs


def jsonl_dataset(path: Path, n: int, output_len: int) -> list[RequestSpec]:
    """Lines of {"prompt": str, "max_tokens"?: int} (or "text"); bad lines are reported."""
    if not path.is_file():
        raise InputError(f"--dataset {path}: no such file")
    specs, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row.get("prompt") or row.get("text")
                if not isinstance(prompt, str) or not prompt:
                    raise ValueError("no 'prompt' string")
                specs.append(RequestSpec(prompt, int(row.get("max_tokens", output_len))))
            except (ValueError, AttributeError) as exc:
                bad.append(f"{number} ({exc})")
    if not specs:
        raise InputError(f"--dataset {path}: no usable prompts (bad lines: {', '.join(bad[:5])})")
    return [specs[i % len(specs)] for i in range(n)]


def text_chunks_dataset(path: Path, tokenizer, n: int, input_len: int, output_len: int):
    """Consecutive chunks of input_len tokens of a text file, each followed by a request to
    continue it."""
    if not path.is_file():
        raise InputError(f"--dataset {path}: no such file")
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
    if len(ids) < input_len:
        raise InputError(f"--dataset {path}: {len(ids)} tokens, fewer than --input-len {input_len}")
    chunks = [ids[i : i + input_len] for i in range(0, len(ids) - input_len + 1, input_len)]
    return [
        RequestSpec(tokenizer.decode(chunks[i % len(chunks)]), output_len, input_len)
        for i in range(n)
    ]


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ordered = sorted(values)

    def pct(p: float) -> float:  # linear interpolation, as numpy's default
        k = (len(ordered) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": sum(ordered) / len(ordered), **{f"p{p}": pct(p) for p in PERCENTILES}}


def _vllm_stats(name: str, values: list[float]) -> dict:
    """vLLM's flat keys for one latency (seconds in, milliseconds out): mean_, median_,
    std_ (population, as numpy's) and p50/p90/p99_ `name`_ms; None without values."""
    stats = _stats(values)
    mean = stats["mean"]
    std = None if mean is None else (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    out = {"mean": mean, "median": stats["p50"], "std": std}
    out.update({f"p{p}": stats[f"p{p}"] for p in PERCENTILES})
    return {f"{k}_{name}_ms": None if v is None else v * 1000 for k, v in out.items()}


def vllm_keys(results: list[RequestResult], wall: float, good: int | None) -> dict:
    """The flat keys `vllm bench serve --save-result` writes (vllm/benchmarks/serve.py), so
    one script reads both tools' JSON: throughputs per second of the run's duration, and
    TTFT, TPOT, ITL and E2EL in ms. request_goodput is None without an SLO, as vLLM's."""
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_s = (lambda n: n / wall) if wall else (lambda n: 0.0)
    keys = {
        "duration": wall,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_s(len(ok)),
        "request_goodput": None if good is None else per_s(good),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
    }
    keys.update(_vllm_stats("ttft", [r.ttft for r in ok if r.ttft is not None]))
    keys.update(_vllm_stats("tpot", [r.tpot for r in ok if r.tpot is not None]))
    keys.update(_vllm_stats("itl", [x for r in ok for x in r.itl]))
    keys.update(_vllm_stats("e2el", [r.e2e for r in ok if r.e2e is not None]))
    return keys


def summarize(
    results: list[RequestResult],
    wall: float,
    slo_ttft: float | None = None,
    slo_tpot: float | None = None,
    slo_e2e: float | None = None,
) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1

    def meets(r: RequestResult) -> bool:
        return (
            (slo_ttft is None or (r.ttft is not None and r.ttft <= slo_ttft))
            and (slo_tpot is None or r.tpot is None or r.tpot <= slo_tpot)
            and (slo_e2e is None or (r.e2e is not None and r.e2e <= slo_e2e))
        )

    good = [r for r in ok if meets(r)]
    output_tokens = sum(r.output_tokens for r in ok)
    e2e = _stats([r.e2e for r in ok if r.e2e is not None])
    summary = {
        "requests": len(results),
        "completed": len(ok),
        "errors": errors,
        "wall_s": round(wall, 3),
        "request_throughput": len(ok) / wall if wall else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall if wall else 0.0,
        "total_tokens_per_s": (output_tokens + sum(r.prompt_tokens for r in ok)) / wall
        if wall
        else 0.0,
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": _stats([x for r in ok for x in r.itl]),
        "e2e_s": e2e,
        "p99_p50_e2e": (e2e["p99"] / e2e["p50"]) if e2e["p50"] else None,
        "goodput": {
            "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot, "e2e_s": slo_e2e},
            "requests_per_s": len(good) / wall if wall else 0.0,
            "fraction": len(good) / len(results) if results else 0.0,
        },
    }
    any_slo = any(x is not None for x in (slo_ttft, slo_tpot, slo_e2e))
    # vLLM's names beside ours (request_throughput and completed mean the same in both).
    summary.update(vllm_keys(results, wall, len(good) if any_slo else None))
    return summary


def per_request(results: list[RequestResult]) -> list[dict]:
    """One record per request, in sending order, for the --json file (where a tail comes
    from: which requests were slow, when they started, and how long they waited)."""
    return [
        {
            "start_s": round(r.start, 4),
            "ok": r.ok,
            "ttft_s": None if r.ttft is None else round(r.ttft, 4),
            "e2e_s": None if r.e2e is None else round(r.e2e, 4),
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "error": r.error,
        }
        for r in results
    ]


def write_plots(results: list[RequestResult], wall: float, out_prefix: Path) -> list[Path]:
    """latency CDFs (TTFT, TPOT, E2E) and output tokens/s over time, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = [r for r in results if r.ok]
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, values) in zip(
        axes,
        (
            ("TTFT", [r.ttft for r in ok if r.ttft is not None]),
            ("TPOT", [r.tpot for r in ok if r.tpot is not None]),
            ("end-to-end", [r.e2e for r in ok if r.e2e is not None]),
        ),
    ):
        ordered = sorted(values)
        if ordered:
            ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.step(ordered, ys, where="post")
            for p in (0.5, 0.99):
                ax.axhline(p, color="grey", lw=0.6, ls="--")
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out_prefix, "latency-cdf"))

    fig, ax = plt.subplots(figsize=(8, 3.5))
    bins = max(1, int(wall) + 1)
    counts = [0] * bins
    for r in ok:
        for t in r.token_times:
            counts[min(int(t), bins - 1)] += 1
    ax.plot(range(bins), counts, drawstyle="steps-post")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput over time")
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out_prefix, "throughput"))
    return paths


def _save(plt, fig, out_prefix: Path, name: str) -> Path:
    fig.tight_layout()
    path = out_prefix.with_name(f"{out_prefix.name}-{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_table(summary: dict, title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for col in ("mean", "P50", "P90", "P99"):
        table.add_column(col, justify="right")
    for key, label in (
        ("ttft_s", "TTFT (ms)"),
        ("tpot_s", "TPOT (ms)"),
        ("itl_s", "ITL (ms)"),
        ("e2e_s", "end-to-end (ms)"),
    ):
        row = summary[key]
        table.add_row(
            label,
            *(
                "-" if row[k] is None else f"{row[k] * 1000:.0f}"
                for k in ("mean", "p50", "p90", "p99")
            ),
        )
    return table
