"""`lmstack bench ladder`: the optimisation story as one measured table.

Every row is a real `lmstack serve` process on 127.0.0.1 with one configuration, driven by
the same closed-loop workload (N concurrent chat users, fresh random prompts so the prefix
cache cannot help). Before the load, each row answers the same greedy prompts; the answers
are compared with row 1 (float32) as a quality check.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from lmstack.bench.loadgen import RequestSpec, run_load
from lmstack.bench.serve import summarize
from lmstack.errors import LmstackError


@dataclass
class Rung:
    name: str
    args: list[str] = field(default_factory=list)


RUNGS = [
    Rung("1. float32, one request at a time", ["--dtype", "float32", "--max-num-seqs", "1"]),
    Rung("2. bf16, one at a time", ["--dtype", "bfloat16", "--max-num-seqs", "1"]),
    Rung("3. int8 weight-only, one at a time", ["--dtype", "int8", "--max-num-seqs", "1"]),
    Rung("4. bf16 + continuous batching", ["--dtype", "bfloat16", "--max-num-seqs", "32"]),
    Rung(
        "5. + timeouts and queue limit",
        [
            "--dtype",
            "bfloat16",
            "--max-num-seqs",
            "32",
            "--default-timeout",
            "60",
            "--max-waiting",
            "64",
        ],
    ),
]
# Greedy answers to these are compared with row 1's. Sixteen, because agreement "until the
# first divergence" is all-or-nothing per prompt: with four, one near-tie flip in one answer
# moved the figure by a quarter.
QUALITY_PROMPTS = [
    "The three primary colours are",
    "Explain in one sentence why the sky is blue.",
    "Write a Python function that reverses a string.",
    "What is the capital of Japan?",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into French and Spanish.",
    "What is 17 times 3?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Name a mammal that can fly.",
    "How do I make a cup of tea?",
    "List the planets of the solar system in order.",
    "What does HTTP stand for?",
    "Write a haiku about autumn.",
    "Why do we have seasons on Earth?",
    "Suggest a name for a pet goldfish.",
    "What is the boiling point of water in Fahrenheit?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_gb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):  # the kernel's high-water mark of resident memory
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


def launch(
    cmd: list[str], url: str, ready_path: str, name: str, wait_s: float = 180
) -> subprocess.Popen:
    """Start a server process and wait until GET url+ready_path answers 200."""
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LmstackError(f"server for {name!r} exited: {proc.stderr.read()[-500:]}")
        try:
            if httpx.get(f"{url}{ready_path}", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise LmstackError(f"server for {name!r} not ready after {wait_s:.0f} s")


def lmstack_server(args: list[str], model: str, name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--port", str(port), "--model", model]
    # Generation only: rows stay comparable with each other, with earlier runs and with
    # llama.cpp's server (bench compare), none of which loads the sentence embedder.
    cmd.append("--no-embeddings")
    url = f"http://127.0.0.1:{port}"
    return launch([*cmd, *args], url, "/ready", name), url


def _start_server(rung: Rung, model: str) -> tuple[subprocess.Popen, str]:
    return lmstack_server(rung.args, model, rung.name)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _greedy_answers(url: str, tokens: int) -> list[list[str]]:
    import httpx

    answers = []
    for prompt in QUALITY_PROMPTS:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
            "logprobs": True,
        }
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        content = r.json()["choices"][0]["logprobs"]["content"] or []
        answers.append([t["token"] for t in content])
    return answers


def agreement(reference: list[list[str]], other: list[list[str]]) -> float:
    """Share of reference tokens reproduced before the first divergence, over all prompts."""
    same = total = 0
    for ref, got in zip(reference, other):
        total += len(ref)
        for a, b in zip(ref, got):
            if a != b:
                break
            same += 1
    return same / total if total else 1.0


def first_token_agreement(reference: list[list[str]], other: list[list[str]]) -> float:
    """Share of prompts whose first greedy token is row 1's: one position per prompt, read
    from the same prompt, so unlike `agreement` an early flip does not compound."""
    pairs = [(ref[0], got[0] if got else None) for ref, got in zip(reference, other) if ref]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 1.0


def run_ladder(
    specs: list[RequestSpec],
    users: int,
    model: str = "bundled",
    rungs: list[Rung] | None = None,
    quality_tokens: int = 32,
    progress=None,
) -> list[dict]:
    rows, reference = [], None
    for rung in rungs or RUNGS:
        if progress:
            progress(f"starting {rung.name}")
        proc, url = _start_server(rung, model)
        try:
            answers = _greedy_answers(url, quality_tokens)
            reference = reference or answers
            results, wall = asyncio.run(run_load(url, specs, concurrency=users))
            peak = _peak_rss_gb(proc.pid)
        finally:
            stop(proc)
        s = summarize(results, wall)
        ok = [r for r in results if r.ok]
        per_user = [r.output_tokens / r.e2e for r in ok if r.e2e]
        rows.append(
            {
                "config": rung.name,
                "server_args": " ".join(rung.args),
                "ttft_p50_s": s["ttft_s"]["p50"],
                "ttft_p99_s": s["ttft_s"]["p99"],
                "tokens_per_s_per_user": sum(per_user) / len(per_user) if per_user else 0.0,
                "tokens_per_s_total": s["output_tokens_per_s"],
                "e2e_p50_s": s["e2e_s"]["p50"],
                "e2e_p99_s": s["e2e_s"]["p99"],
                "p99_p50_e2e": s["p99_p50_e2e"],
                "errors": sum(s["errors"].values()),
                "peak_rss_gb": peak,
                "greedy_agreement_vs_row1": agreement(reference, answers),
                "first_token_agreement_vs_row1": first_token_agreement(reference, answers),
                "completed": s["completed"],
                "requests": s["requests"],
            }
        )
        if progress:
            progress(f"done {rung.name}: {s['output_tokens_per_s']:.1f} tokens/s")
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| configuration | TTFT P50 (s) | TTFT P99 (s) | tok/s per user | tok/s total "
        "| P99/P50 latency | errors | peak RSS (GB) | greedy agreement vs row 1 "
        "| same first token as row 1 |"
    )
    lines = [head, "|" + "---|" * 10]

    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in rows:
        lines.append(
            f"| {r['config']} | {f(r['ttft_p50_s'], '.2f')} | {f(r['ttft_p99_s'], '.2f')} | "
            f"{f(r['tokens_per_s_per_user'], '.1f')} | {f(r['tokens_per_s_total'], '.1f')} | "
            f"{f(r['p99_p50_e2e'], '.2f')} | {r['errors']} | {f(r['peak_rss_gb'], '.2f')} | "
            f"{r['greedy_agreement_vs_row1']:.0%} | {r['first_token_agreement_vs_row1']:.0%} |"
        )
    return "\n".join(lines) + "\n"
