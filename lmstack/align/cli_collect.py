"""`lmstack align collect ...`: plan comparisons, AI feedback, QC, import and export."""

from __future__ import annotations

from pathlib import Path

import typer

from lmstack.align.cli_common import dump, echo_report
from lmstack.errors import InputError

collect_app = typer.Typer(help="Plan comparisons, rate with AI feedback, QC, import, export.")


@collect_app.command("plan")
def plan_command(
    prompts: Path = typer.Option(..., "--prompts", help="JSONL / .txt / preference file"),
    out: Path = typer.Option(..., "--out", help="New directory for the plan and ratings.db"),
    stratify_by: str | None = typer.Option(None, "--stratify-by", help="Prompt field"),
    raters: str = typer.Option("rater1,rater2,rater3", "--raters", help="Comma-separated"),
    max_tokens: int = typer.Option(192, "--max-tokens", help="Tokens per response"),
    seed: int = typer.Option(0, "--seed"),
    model: str | None = typer.Option(None, "--model", help="Policy to sample (HF dir)"),
    llm_url: str | None = typer.Option(None, "--llm-url", help="OpenAI-compatible server"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Split prompts, generate 4 responses each, plan comparisons and rater assignments."""
    from lmstack.align.collect import PlanConfig, plan
    from lmstack.align.data import load_prompts
    from lmstack.llm import make_generator

    items, report = load_prompts(prompts)
    echo_report(report)
    names = [r.strip() for r in raters.split(",") if r.strip()]
    if len(set(names)) != len(names):
        raise InputError(f"--raters has duplicates: {raters}")
    if max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {max_tokens}")
    config = PlanConfig(stratify_by=stratify_by, raters=names, max_tokens=max_tokens, seed=seed)
    generator = make_generator(llm_url=llm_url, model=model)
    try:
        summary = plan(items, out, generator, config)
    finally:
        generator.close()
    if as_json:
        dump(summary)
    else:
        typer.echo(
            f"splits {summary['splits']}; {summary['responses']} responses; comparisons "
            f"{summary['comparisons']}; rater tokens in {summary['tokens']}"
        )


@collect_app.command("qc")
def qc_command(
    db: Path = typer.Option(..., "--db", help="ratings.db from the plan"),
    threshold: float = typer.Option(0.9, "--threshold", help="Flag raters below this"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-rater consistency and gold accuracy, agreement, kappa, pending tie-breaks."""
    from lmstack.align.qc import format_report, qc_report
    from lmstack.align.ratings import RatingStore

    report = qc_report(RatingStore(db), threshold)
    dump(report) if as_json else typer.echo(format_report(report))


@collect_app.command("rate-ai")
def rate_ai_command(
    db: Path = typer.Option(..., "--db", help="ratings.db from the plan"),
    principles: Path = typer.Option(..., "--principles", help="Text file, one per line"),
    llm_url: str | None = typer.Option(None, "--llm-url", help="A stronger served model"),
    model: str | None = typer.Option(None, "--model", help="In-process model (HF dir)"),
    limit: int | None = typer.Option(None, "--limit", help="Rate at most this many"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Rate planned comparisons against written principles with a model (AI feedback)."""
    from lmstack.align.ai_feedback import load_principles, rate_ai
    from lmstack.align.ratings import RatingStore
    from lmstack.llm import make_generator

    rules = load_principles(principles)
    store = RatingStore(db)
    generator = make_generator(llm_url=llm_url, model=model)
    try:
        summary = rate_ai(store, rules, generator, limit=limit)
    finally:
        generator.close()
    dump(summary) if as_json else typer.echo(
        f"{summary['rated']} comparisons rated by {summary['rater']}: {summary['choices']}"
    )


@collect_app.command("import")
def import_command(
    files: list[Path] = typer.Argument(..., help="ShareGPT JSON, Anthropic HH or JSONL"),
    out: Path = typer.Option(..., "--out", help="Pairs JSONL to write"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Convert existing preference data to pairs JSONL (bad records reported and skipped)."""
    from lmstack.align.data import load_pairs, write_pairs

    pairs, reports = [], []
    for file in files:
        got, report = load_pairs(file)
        echo_report(report)
        pairs += got
        reports.append({"file": str(file), "kept": report.kept, "skipped": len(report.skipped)})
    write_pairs(pairs, out)
    dump({"pairs": len(pairs), "files": reports}) if as_json else typer.echo(
        f"{len(pairs)} pairs -> {out}"
    )


@collect_app.command("export")
def export_command(
    db: Path = typer.Option(..., "--db", help="ratings.db from the plan"),
    out: Path = typer.Option(..., "--out", help="Directory for pairs_*.jsonl"),
    source: str = typer.Option("human", "--source", help="human, ai or all"),
) -> None:
    """Resolved ratings (majority, tie-break) as reward-train/validation pairs."""
    from lmstack.align.collect import export_pairs
    from lmstack.align.ratings import RatingStore

    dump(export_pairs(RatingStore(db), out, source))
