"""`lmstack bench ...` commands."""

from __future__ import annotations

import json

import typer

bench_app = typer.Typer(
    help="Measure speed and memory against a baseline in the same run.", no_args_is_help=True
)


@bench_app.command("offline")
def offline_command(
    requests: int = typer.Option(32, "--requests", help="Number of requests"),
    input_len: int = typer.Option(128, "--input-len", help="Prompt tokens per request"),
    output_len: str = typer.Option("128", "--output-len", help="N, or A:B drawn uniformly"),
    seed: int = typer.Option(0, "--seed"),
    baseline: str = typer.Option("hf", "--baseline", help="hf, hf-bf16, hf-batch or none"),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="Engine dtype: "
        + "auto (chosen for this CPU), float32, bfloat16, int8, gguf, q4_1, q4_0 or q8_0",
    ),
    max_num_seqs: int = typer.Option(32, "--max-num-seqs"),
    max_num_batched_tokens: int = typer.Option(1024, "--max-num-batched-tokens"),
    kv_cache_gb: float | None = typer.Option(None, "--kv-cache-gb"),
    model: str = typer.Option("bundled", "--model"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """N random-prompt requests through the engine and through the baseline."""
    from lmstack.bench.offline import bench_offline

    options = {
        "model": model,
        "dtype": dtype,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
    }
    if kv_cache_gb is not None:
        options["kv_cache_gb"] = kv_cache_gb
    result = bench_offline(requests, input_len, output_len, seed, baseline, options)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    w = result["workload"]
    table = Table(
        title=f"offline: {w['requests']} requests, {w['input_len']} prompt tokens, "
        f"output {w['output_len']} ({w['output_tokens']} tokens)"
    )
    for col in ("run", "output tok/s", "wall s", "peak RSS GB", "speedup"):
        table.add_column(col, justify="right" if col != "run" else "left")
    eng = result["engine"]
    table.add_row(
        f"lmstack engine ({eng['dtype']})",
        f"{eng['output_tokens_per_s']:.1f}",
        f"{eng['wall_s']:.2f}",
        f"{eng['peak_rss_gb']:.2f}",
        "",
    )
    if "baseline" in result:
        base = result["baseline"]
        table.add_row(
            f"baseline {base['name']}",
            f"{base['output_tokens_per_s']:.1f}",
            f"{base['wall_s']:.2f}",
            f"{base['peak_rss_gb']:.2f}",
            f"{result['speedup']:.2f}x",
        )
    Console().print(table)


@bench_app.command("kernels")
def kernels_command(
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto, float32, bfloat16 or a block format (gguf, q4_1, q8_0)"
    ),
    model: str = typer.Option("bundled", "--model", help="Model whose shapes to use"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows"),
) -> None:
    """Packed linear layers and fused prefill attention vs the plain torch calls."""
    from lmstack.bench.kernels import bench_kernels
    from lmstack.errors import InputError
    from lmstack.model.llama import parse_dtype, resolve_dtype
    from lmstack.model.qlinear import FORMATS
    from lmstack.model.weights import load_config, resolve_model

    dtype, _ = resolve_dtype(dtype, model)
    kernel_dtype = dtype if dtype in FORMATS else parse_dtype(dtype)
    config = load_config(resolve_model(model))
    try:
        rows = bench_kernels(config, kernel_dtype)
    except RuntimeError as exc:
        raise InputError(str(exc)) from None
    if as_json:
        from lmstack.bench.report import meta

        saved = {"kind": "kernels", "meta": meta(), "dtype": str(dtype), "rows": rows}
        typer.echo(json.dumps(saved, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CPU kernels, {dtype}, shapes of {model} (median of 5, interleaved)")
    for col in ("kernel", "shape", "torch ms", "lmstack ms", "speedup"):
        table.add_column(col, justify="left" if col in ("kernel", "shape") else "right")
    for r in rows:
        table.add_row(
            r["kernel"],
            r["shape"],
            f"{r['baseline_ms']:.3f}",
            f"{r['lmstack_ms']:.3f}",
            f"{r['speedup']:.2f}x",
        )
    Console().print(table)


@bench_app.command("precision")
def precision_command(
    text: str | None = typer.Option(
        None, "--text", help="File or folder of .md (default: NIST report)"
    ),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens of the text to score"),
    window: int = typer.Option(1024, "--window", help="Tokens per perplexity window"),
    dtypes: str = typer.Option("float32,bfloat16,int8,gguf,q8_0", "--dtypes"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Weights memory, single-stream decode speed and perplexity per dtype, vs fp32."""
    from pathlib import Path

    from lmstack.bench.precision import bench_precision
    from lmstack.config import data_dir

    path = Path(text) if text else data_dir() / "nist-sp800-63-3"
    result = bench_precision(path, max_tokens, window, [d.strip() for d in dtypes.split(",")])
    if as_json:
        from lmstack.bench.report import meta

        typer.echo(json.dumps({"kind": "precision", "meta": meta(), **result}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"precision: perplexity on {result['tokens']} tokens of {path.name}, {result['cpu']}"
    )
    for col in (
        "dtype",
        "weights GB",
        "decode tok/s",
        "perplexity",
        "ppl vs fp32",
        "speed vs fp32",
        "greedy agree",
    ):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for name, row in result["dtypes"].items():
        table.add_row(
            name,
            f"{row['weights_gb']:.3f}",
            f"{row['decode_tokens_per_s']:.1f}",
            f"{row['perplexity']:.3f}",
            str(row.get("perplexity_vs_fp32", "")),
            str(row.get("speed_vs_fp32", "")),
            str(row.get("greedy_agreement_vs_fp32", "")),
        )
    Console().print(table)


@bench_app.command("serve")
def serve_command(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="OpenAI-compatible server"),
    model: str | None = typer.Option(
        None, "--model", help="Model name (default: the first; embeddings: the server's)"
    ),
    num_prompts: int = typer.Option(100, "--num-prompts", help="Requests to send"),
    concurrency: int | None = typer.Option(None, "--concurrency", help="Closed loop: users"),
    request_rate: float | None = typer.Option(None, "--request-rate", help="Open loop: req/s"),
    burstiness: float = typer.Option(1.0, "--burstiness", help="Gamma shape; 1 = Poisson"),
    dataset: str = typer.Option("random", "--dataset", help="random, a .jsonl, or a text file"),
    input_len: int = typer.Option(128, "--input-len"),
    output_len: int = typer.Option(128, "--output-len"),
    seed: int = typer.Option(0, "--seed"),
    slo_ttft: float | None = typer.Option(None, "--slo-ttft", help="Goodput SLO, seconds"),
    slo_tpot: float | None = typer.Option(None, "--slo-tpot", help="Goodput SLO, seconds"),
    slo_e2e: float | None = typer.Option(None, "--slo-e2e", help="Goodput SLO, seconds"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="LMSTACK_API_KEY"),
    json_out: str | None = typer.Option(
        None, "--json", help="Write the summary and per-request records to this file"
    ),
    plot: str | None = typer.Option(None, "--plot", help="PNG prefix for CDFs and throughput"),
    endpoint: str = typer.Option(
        "completions",
        "--endpoint",
        help="completions or chat (streamed), or embeddings (/v1/embeddings)",
    ),
    batch: int = typer.Option(1, "--batch", help="Inputs per request with --endpoint embeddings"),
    tools: str | None = typer.Option(
        None, "--tools", help="--endpoint chat: a JSON file of OpenAI tools sent with every request"
    ),
    tool_choice: str | None = typer.Option(
        None, "--tool-choice", help="With --tools: auto, required, none, or a function name"
    ),
) -> None:
    """Stream requests to a server and report TTFT, TPOT, ITL, latency and goodput."""
    import asyncio
    from pathlib import Path

    from rich.console import Console

    from lmstack.bench import serve
    from lmstack.bench.loadgen import (
        ENDPOINTS,
        ChatOptions,
        embedding_specs,
        load_tools,
        run_load,
        tool_choice_option,
    )
    from lmstack.errors import InputError
    from lmstack.model.tokenizer import Tokenizer
    from lmstack.model.weights import resolve_model

    if concurrency is not None and request_rate is not None:
        raise InputError("give --concurrency (closed loop) or --request-rate (open loop), not both")
    if num_prompts < 1:
        raise InputError(f"--num-prompts must be >= 1, got {num_prompts}")
    if endpoint not in ENDPOINTS:
        raise InputError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if batch < 1 or (batch > 1 and endpoint != "embeddings"):
        raise InputError(f"--batch must be >= 1 and is for --endpoint embeddings, got {batch}")
    if (tools or tool_choice) and endpoint != "chat":
        raise InputError(f"--tools and --tool-choice need --endpoint chat, got {endpoint!r}")
    if tool_choice and not tools:
        raise InputError("--tool-choice needs --tools FILE")
    chat = ChatOptions(load_tools(tools), tool_choice_option(tool_choice)) if tools else None
    embeddings = endpoint == "embeddings"
    texts = num_prompts * batch  # an embeddings request takes `batch` of the dataset's prompts
    path = Path(dataset)
    if dataset == "random" or path.suffix == ".jsonl":
        tokenizer = Tokenizer(resolve_model("bundled")) if dataset == "random" else None
        specs = (
            serve.random_dataset(tokenizer, texts, input_len, output_len, seed)
            if tokenizer
            else serve.jsonl_dataset(path, texts, output_len)
        )
    else:
        specs = serve.text_chunks_dataset(
            path, Tokenizer(resolve_model("bundled")), texts, input_len, output_len
        )
    if embeddings:
        specs = embedding_specs(specs, batch)
    results, wall = asyncio.run(
        run_load(
            url,
            specs,
            endpoint=endpoint,
            model=model,
            concurrency=concurrency if request_rate is None else None,
            request_rate=request_rate,
            burstiness=burstiness,
            seed=seed,
            api_key=api_key,
            chat=chat,
        )
    )
    summary = serve.summarize(results, wall, slo_ttft, slo_tpot, slo_e2e)
    console = Console()
    mode = (
        f"{request_rate} req/s (burstiness {burstiness})"
        if request_rate
        else f"{concurrency or 1} concurrent users"
    )
    console.print(serve.render_table(summary, f"{url}: {len(results)} requests, {mode}"))
    if embeddings:
        console.print(
            f"embeddings, {batch} inputs per request: {summary['request_throughput']:.2f} req/s, "
            f"{summary['request_throughput'] * batch:.1f} inputs/s, "
            f"{summary['total_token_throughput']:.0f} tokens/s"
        )
    console.print(
        f"completed {summary['completed']}/{summary['requests']}, errors {summary['errors'] or 0}, "
        f"{summary['request_throughput']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output "
        f"tokens/s, P99/P50 e2e {summary['p99_p50_e2e'] or 0:.2f}, goodput "
        f"{summary['goodput']['requests_per_s']:.2f} req/s ({summary['goodput']['fraction']:.0%})"
    )
    if json_out:
        run = {"endpoint": endpoint, "batch": batch, "burstiness": burstiness}
        run |= {"tools": len(chat.tools) if chat else 0, "tool_choice": tool_choice}
        run |= {"max_concurrency": concurrency, "request_rate": request_rate}  # vLLM's names
        detail = {**summary, **run, "per_request": serve.per_request(results)}
        Path(json_out).write_text(json.dumps(detail, indent=2))
    if plot:
        for png in serve.write_plots(results, wall, Path(plot)):
            console.print(f"wrote {png}")


@bench_app.command("ladder")
def ladder_command(
    users: int = typer.Option(20, "--users", help="Concurrent chat users (closed loop)"),
    requests: int = typer.Option(40, "--requests", help="Requests in each row's workload"),
    input_len: int = typer.Option(130, "--input-len"),
    output_len: int = typer.Option(128, "--output-len"),
    rows: str = typer.Option("1,2,3,4,5", "--rows", help="Which rows to run, e.g. 1,4"),
    seed: int = typer.Option(0, "--seed"),
    model: str = typer.Option("bundled", "--model"),
    json_out: str | None = typer.Option(None, "--json", help="Write the rows as JSON here"),
    markdown_out: str | None = typer.Option(None, "--markdown", help="Write the table here"),
) -> None:
    """float32 one-at-a-time -> bf16 -> int8 -> continuous batching -> limits, measured."""
    from pathlib import Path

    from rich.console import Console

    from lmstack.bench import ladder, serve
    from lmstack.errors import InputError
    from lmstack.model.tokenizer import Tokenizer
    from lmstack.model.weights import resolve_model

    try:
        chosen = [ladder.RUNGS[int(i) - 1] for i in rows.split(",")]
    except (ValueError, IndexError):
        raise InputError(f"--rows {rows!r}: give numbers from 1 to {len(ladder.RUNGS)}") from None
    if users < 1 or requests < 1:
        raise InputError("--users and --requests must be >= 1")
    tokenizer = Tokenizer(resolve_model(model))
    specs = serve.random_dataset(tokenizer, requests, input_len, output_len, seed)
    console = Console(stderr=True)
    result = ladder.run_ladder(specs, users, model, chosen, progress=console.log)
    table = ladder.to_markdown(result)
    typer.echo(table)
    if markdown_out:
        Path(markdown_out).write_text(table)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))


@bench_app.command("compare")
def compare_command(
    llama_server: str = typer.Option(
        ..., "--llama-server", help="llama.cpp's llama-server binary (deploy/llama-cpp/build.sh)"
    ),
    gguf: str | None = typer.Option(
        None, "--gguf", help="GGUF both servers run (default: bundled)"
    ),
    users: int = typer.Option(20, "--users", help="Closed-loop users of the loaded workload"),
    num_prompts: int = typer.Option(60, "--num-prompts", help="Requests of the loaded workload"),
    single_prompts: int = typer.Option(8, "--single-prompts", help="Single-stream requests"),
    input_len: int = typer.Option(130, "--input-len"),
    output_len: int = typer.Option(128, "--output-len"),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option(
        "auto", "--dtype", help="lmstack's precision (default: what `serve` picks here)"
    ),
    json_out: str | None = typer.Option(None, "--json", help="Write the result as JSON here"),
) -> None:
    """lmstack serve vs llama.cpp's llama-server on one GGUF: single stream and N users."""
    from pathlib import Path

    from rich.console import Console

    from lmstack.bench import compare, serve
    from lmstack.errors import InputError
    from lmstack.model.tokenizer import Tokenizer
    from lmstack.model.weights import bundled_gguf_path, resolve_model

    if users < 1 or num_prompts < 1 or single_prompts < 1:
        raise InputError("--users, --num-prompts and --single-prompts must be >= 1")
    path = Path(gguf) if gguf else bundled_gguf_path()
    tokenizer = Tokenizer(resolve_model(str(path)))
    workloads = {
        "single stream": (
            serve.random_dataset(tokenizer, single_prompts, input_len, output_len, seed),
            1,
        ),
        f"{users} users": (
            serve.random_dataset(tokenizer, num_prompts, input_len, output_len, seed + 1),
            users,
        ),
    }
    console = Console(stderr=True)
    result = compare.run_compare(
        Path(llama_server),
        path,
        workloads,
        input_len + output_len,
        lmstack_args=["--dtype", dtype],
        log=console.log,
    )
    typer.echo(compare.to_markdown(result))
    if json_out:
        from lmstack.bench.report import meta

        saved = {"kind": "compare", "meta": meta(), **result}
        Path(json_out).write_text(json.dumps(saved, indent=2))


@bench_app.command("report")
def report_command(
    files: list[str] = typer.Argument(..., help="JSON outputs of bench kernels/precision/compare"),
    out: str = typer.Option("docs/benchmarks.md", "--out", help="Markdown file to write"),
) -> None:
    """Render saved benchmark JSON (with its date, commit and CPU) as one markdown page."""
    from pathlib import Path

    from lmstack.bench.report import render

    Path(out).write_text(render([Path(f) for f in files]))
    typer.echo(f"wrote {out}")
