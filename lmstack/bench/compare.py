"""`lmstack bench compare`: lmstack's server and llama.cpp's `llama-server`, side by side.

Both servers run on this machine, one after the other, on the same GGUF (the bundled
SmolLM2 Q4_1 unless `--gguf`), each with its defaults for this CPU and as many threads as
cores; the same load generator (`lmstack bench serve`'s) drives both with the same
requests: fresh random prompts (no prefix-cache help), greedy, a fixed output length
(`ignore_eos`). Two workloads:
- single stream: one user, one request after another (decode speed as a user sees it);
- N users: N closed-loop streaming users (`--users`, 20 by default).
The result is one row per server and workload, and lmstack's ratio to llama.cpp for each.

llama-server is not shipped with lmstack: `deploy/llama-cpp/build.sh` builds it offline
from the registry's llama.cpp source package for this CPU's instruction sets.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from lmstack.bench import ladder
from lmstack.bench.loadgen import RequestSpec, run_load
from lmstack.bench.serve import summarize
from lmstack.errors import InputError

SLOTS_MARGIN = 64  # tokens per llama.cpp slot beyond prompt + output (template, rounding)


def llama_cpp_command(binary: Path, gguf: Path, port: int, slots: int, context: int) -> list:
    threads = os.cpu_count() or 1
    return [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(slots * context),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--no-webui",
    ]


def _row(server: str, workload: str, results, wall: float) -> dict:
    s = summarize(results, wall)
    return {
        "server": server,
        "workload": workload,
        "output_tokens_per_s": round(s["output_tokens_per_s"], 1),
        "ttft_p50_s": s["ttft_s"]["p50"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "tpot_p50_s": s["tpot_s"]["p50"],
        "p99_p50_e2e": s["p99_p50_e2e"],
        "errors": sum(s["errors"].values()),
        "completed": s["completed"],
        "requests": s["requests"],
    }


def _drive(url: str, workloads: dict[str, tuple[list[RequestSpec], int]], name: str, log):
    rows = []
    for workload, (specs, users) in workloads.items():
        results, wall = asyncio.run(run_load(url, specs, concurrency=users))
        row = _row(name, workload, results, wall)
        if log:
            log(f"{name}, {workload}: {row['output_tokens_per_s']} output tok/s")
        rows.append(row)
    return rows


def run_compare(
    llama_server: Path,
    gguf: Path,
    workloads: dict[str, tuple[list[RequestSpec], int]],
    max_len: int,
    lmstack_args: list[str] | None = None,
    log=None,
) -> dict:
    if not llama_server.is_file() or not os.access(llama_server, os.X_OK):
        raise InputError(
            f"--llama-server {llama_server}: no executable there (deploy/llama-cpp/build.sh "
            "builds one)"
        )
    if not gguf.is_file():
        raise InputError(f"--gguf {gguf}: no such file")
    from lmstack.cpu import describe

    rows = []
    proc, url = ladder.lmstack_server(lmstack_args or [], str(gguf), "lmstack serve")
    try:
        precision = _precision(url)
        rows += _drive(url, workloads, "lmstack", log)
    finally:
        ladder.stop(proc)
    users = max(n for _, n in workloads.values())
    port = ladder.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = llama_cpp_command(llama_server, gguf, port, users, max_len + SLOTS_MARGIN)
    proc = ladder.launch(cmd, url, "/health", "llama-server")
    try:
        rows += _drive(url, workloads, "llama.cpp", log)
    finally:
        ladder.stop(proc)
    ratios = {}
    for workload in workloads:
        ours, theirs = (
            next(r for r in rows if r["server"] == s and r["workload"] == workload)
            for s in ("lmstack", "llama.cpp")
        )
        if theirs["output_tokens_per_s"]:
            ratios[workload] = round(ours["output_tokens_per_s"] / theirs["output_tokens_per_s"], 2)
    return {
        "cpu": describe(),
        "gguf": str(gguf),
        "lmstack_precision": precision,
        "llama_cpp_build": llama_cpp_build(llama_server),
        "llama_server_command": " ".join(cmd),
        "rows": rows,
        "output_tokens_per_s_ratio": ratios,
    }


def _precision(url: str) -> str | None:
    import httpx

    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    return card.get("dtype")


def llama_cpp_build(binary: Path) -> str:
    """Which instruction sets the llama.cpp build may use: deploy/llama-cpp/build.sh builds
    into a folder of its own under LMSTACK_CPU_ISA=avx2 (no AVX-512), else for every
    extension this CPU has."""
    return "avx2" if "llama-cpp-avx2" in Path(binary).parts else "native"


def to_markdown(result: dict) -> str:
    head = f"CPU: {result['cpu']}; lmstack precision: {result['lmstack_precision']}"
    build = result.get("llama_cpp_build")
    if build:
        head += "; llama.cpp built " + (
            "without AVX-512 (LMSTACK_CPU_ISA=avx2)" if build == "avx2" else "for this CPU"
        )
    lines = [
        head,
        "",
        "| server | workload | output tok/s | TTFT P50 (s) | TTFT P99 (s) | TPOT P50 (ms) "
        "| P99/P50 e2e | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        tpot = None if r["tpot_p50_s"] is None else r["tpot_p50_s"] * 1e3
        lines.append(
            f"| {r['server']} | {r['workload']} | {r['output_tokens_per_s']:.1f} | "
            f"{f(r['ttft_p50_s'], '.2f')} | {f(r['ttft_p99_s'], '.2f')} | {f(tpot, '.1f')} | "
            f"{f(r['p99_p50_e2e'], '.2f')} | {r['errors']} |"
        )
    lines.append("")
    for workload, ratio in result["output_tokens_per_s_ratio"].items():
        lines.append(f"- {workload}: lmstack / llama.cpp = {ratio:.2f}x output tokens/s")
    return "\n".join(lines) + "\n"
