"""`lmstack plan ...`: context-window and GPU-memory capacity planners."""

from __future__ import annotations

import json
from pathlib import Path

import typer

plan_app = typer.Typer(
    help="Capacity planning: does a document fit the context, how many sequences fit a GPU.",
    no_args_is_help=True,
)


@plan_app.command("tokens")
def tokens_command(
    words: int | None = typer.Option(None, "--words", help="Document length in words"),
    pages: int | None = typer.Option(None, "--pages", help="Document length in pages (500 words)"),
    file: Path | None = typer.Option(None, "--file", help="UTF-8 text file to count"),
    window: int = typer.Option(8192, "--window", help="Model context window in tokens"),
    system: int = typer.Option(200, "--system", help="Tokens for the system prompt"),
    reserve: int = typer.Option(500, "--reserve", help="Tokens kept for the answer"),
    language: str = typer.Option("en", "--language", help="en, or zh (--words are characters)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """How much of a document fits the context window, and which strategy to use."""
    from lmstack.plan import plan_tokens

    plan = plan_tokens(
        words=words,
        pages=pages,
        file=file,
        window=window,
        system=system,
        reserve=reserve,
        language=language,
    )
    if as_json:
        typer.echo(json.dumps(plan, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Context budget", title_justify="left")
    table.add_column("item")
    table.add_column("tokens", justify="right")
    table.add_column("how")
    what = f"{plan['count']:,} {plan['unit']}"
    if plan["tokenizer_tokens"] is not None:
        table.add_row("document (tokenizer)", f"{plan['tokenizer_tokens']:,}", "bundled SmolLM2")
        table.add_row("document (rule of thumb)", f"{plan['rule_of_thumb_tokens']:,}", what)
    else:
        table.add_row("document", f"{plan['document_tokens']:,}", what)
    table.add_row("context window", f"{plan['window']:,}", "")
    table.add_row("system prompt", f"-{plan['system']:,}", "")
    table.add_row("reserved for the answer", f"-{plan['reserve']:,}", "")
    table.add_row("available for the document", f"{plan['available_tokens']:,}", "")
    table.add_row("coverage", f"{plan['coverage']:.1%}", f"{plan['chunks']} window(s) needed")
    console = Console()
    console.print(table)
    for note in plan["notes"]:
        console.print(f"note: {note}", highlight=False)
    console.print(f"strategy: {plan['strategy']} - {plan['strategy_reason']}", highlight=False)
    if plan["whole_document_strategy"]:
        console.print(
            f"whole-document tasks (summaries): {plan['whole_document_strategy']}",
            highlight=False,
        )


@plan_app.command("memory")
def memory_command(
    params: str | None = typer.Option(None, "--params", help="Parameter count: 7e9 or 7B"),
    layers: int | None = typer.Option(None, "--layers", help="Decoder layers (default 32)"),
    kv_heads: int | None = typer.Option(None, "--kv-heads", help="KV heads (default 32)"),
    head_dim: int | None = typer.Option(None, "--head-dim", help="Head dimension (default 128)"),
    hidden: int | None = typer.Option(None, "--hidden", help="Hidden size"),
    model: str | None = typer.Option(None, "--model", help="'bundled' or a dir with config.json"),
    dtype: str = typer.Option("fp16", "--dtype", help="fp32, fp16, bf16, int8 or int4"),
    gpu_gb: float = typer.Option(24.0, "--gpu-gb", help="Memory of each device in GB (1e9 B)"),
    context: int = typer.Option(4096, "--context", help="Tokens per sequence"),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", help="Devices to split over"),
    overhead: float = typer.Option(
        0.0, "--overhead", help="Fraction of device memory kept for activations"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Weights, KV cache and how many sequences fit each device; prints a vllm command."""
    from lmstack.plan import RECOMMENDED_HEADROOM, plan_memory

    plan = plan_memory(
        params=params,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=hidden,
        model=model,
        dtype=dtype,
        gpu_gb=gpu_gb,
        context=context,
        tensor_parallel=tensor_parallel,
        overhead=overhead,
    )
    if as_json:
        typer.echo(json.dumps(plan, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    tp = plan["tensor_parallel"]
    table = Table(
        title=f"{plan['params'] / 1e9:.3g}B params, {plan['dtype']}, {plan['gpu_gb']:g} GB "
        f"x {tp} device(s), {plan['context']:,}-token sequences"
        + (", per device" if tp > 1 else ""),
        title_justify="left",
    )
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_column("how")
    table.add_row(
        "weights",
        f"{plan['weights_gb']:.2f} GB",
        f"{plan['params']:,} x {plan['bytes_per_param']:g} B" + (f" / {tp}" if tp > 1 else ""),
    )
    table.add_row("fits", "yes" if plan["fits"] else "NO", f"device has {plan['gpu_gb']:g} GB")
    table.add_row(
        "KV cache / token",
        f"{plan['kv_bytes_per_token']:,} B",
        f"2 x {plan['layers']} layers x {plan['kv_heads']} heads x {plan['head_dim']} "
        f"x {plan['kv_bytes_per_element']} B" + (f" / {tp}" if tp > 1 else ""),
    )
    table.add_row(
        "KV cache / sequence",
        f"{plan['kv_gb_per_sequence']:.3f} GB",
        f"x {plan['context']:,} tokens",
    )
    if plan["overhead"] > 0:
        table.add_row(
            "activation headroom",
            f"{plan['gpu_gb'] * plan['overhead']:.2f} GB",
            f"--overhead {plan['overhead']:g}",
        )
    table.add_row("free for KV cache", f"{plan['free_gb_for_kv']:.2f} GB", "")
    table.add_row(
        "max concurrent seqs",
        str(plan["max_sequences"]),
        f"floor(free / {plan['kv_gb_per_sequence']:.3f} GB)",
    )
    console = Console()
    console.print(table)
    for note in plan["notes"]:
        console.print(f"note: {note}", highlight=False)
    if plan["fits"] and plan["overhead"] == 0:
        console.print(
            f"recommended: keep ~{RECOMMENDED_HEADROOM:.0%} for activations and the "
            "CUDA context (as --gpu-memory-utilization 0.90 does; plan it with --overhead "
            f"{RECOMMENDED_HEADROOM:g}): then {plan['max_sequences_with_headroom']} "
            "sequences fit",
            highlight=False,
        )
    console.print(plan["vllm_command"], highlight=False, soft_wrap=True)
    if plan["vllm_note"]:
        console.print(f"note: {plan['vllm_note']}", highlight=False)
