"""`lmstack triage eval` and `lmstack triage bench`: quality against gold labels beside the
keyword baseline (and the category classifier alone), and speed, concurrent against one at a
time, in the same run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from lmstack.errors import InputError
from lmstack.triage.cli_common import (
    TriagerOptions,
    make_triager,
    triage_app,
    triage_in_batches,
    with_triager_options,
)


@triage_app.command("eval")
@with_triager_options
def eval_command(
    file: Path | None = typer.Argument(
        None, help="Labelled CSV/JSONL (default: the built-in held-out split)", show_default=False
    ),
    category_field: str = typer.Option("category", "--category-field"),
    urgency_field: str | None = typer.Option(None, "--urgency-field"),
    label_map: Path | None = typer.Option(None, "--map", help="JSON {dataset label: category}"),
    subject_field: str | None = typer.Option(None, "--subject-field"),
    body_field: str = typer.Option("body", "--body-field"),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate the first N tickets"),
    plot: Path = typer.Option(Path("triage_confusion.png"), "--plot", help="Confusion PNG"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report here"),
    records_out: Path | None = typer.Option(None, "--out", help="Write the records (JSONL)"),
    options: TriagerOptions | None = None,
) -> None:
    """Category/urgency/entity metrics, validity and latency, vs the keyword baseline."""
    from lmstack.triage.evaluate import evaluate, plot_confusion

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    tickets, golds, source = _eval_set(
        file, category_field, urgency_field, label_map, subject_field, body_field, limit
    )
    triager = make_triager(options)
    started = time.monotonic()
    records = triage_in_batches(triager, tickets, "eval")
    wall_s = time.monotonic() - started
    classifier = triager.config.classifier
    others = {"classifier alone": classifier.predict([g.text for g in golds])} if classifier else {}
    report = evaluate(golds, records, wall_s, others)
    report["source"] = source
    report["model_name"] = triager.generator.name
    report["few_shot"] = bool(triager.examples)
    report["category_coverage"] = triager.config.category_coverage if classifier else None
    plot_confusion(report["confusion"], plot, f"triage: {Path(source).name}")
    report["confusion_png"] = str(plot)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if records_out:
        records_out.write_text("".join(r.model_dump_json() + "\n" for r in records))
    _print_report(report)


def _eval_set(file, category_field, urgency_field, label_map, subject_field, body_field, limit):
    from lmstack.triage.evaluate import Gold
    from lmstack.triage.schema import CATEGORIES, ENTITY_FIELDS, URGENCIES, Ticket

    if file is None:
        from lmstack.triage.dataset import heldout_sample

        chosen = heldout_sample(limit)
        tickets = [Ticket(subject=t.subject, body=t.body, id=t.id) for t in chosen]
        golds = [Gold(t.text, t.category, t.urgency, t.entities) for t in chosen]
        return tickets, golds, "held-out split (Bitext + own tickets)"

    from lmstack.triage.inputs import read_tickets

    mapping = {}
    if label_map:
        try:
            mapping = json.loads(label_map.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"--map {label_map}: not a readable JSON object ({exc})") from exc
        bad = {k: v for k, v in mapping.items() if v not in CATEGORIES}
        if not isinstance(mapping, dict) or bad:
            raise InputError(f"--map {label_map}: values must be one of {CATEGORIES}, got {bad}")
    loaded = read_tickets(file, subject_field, body_field)
    for problem in loaded.problems:
        typer.echo(f"warning: {problem}", err=True)
    if loaded.rows and category_field not in loaded.rows[0]:
        raise InputError(f"{file}: no {category_field!r} field (--category-field)")
    if urgency_field and loaded.rows and urgency_field not in loaded.rows[0]:
        raise InputError(f"{file}: no {urgency_field!r} field (--urgency-field)")
    tickets, golds = [], []
    for ticket, row in zip(loaded.tickets, loaded.rows):
        label = str(row.get(category_field, ""))
        category = mapping.get(label, label)
        if category not in CATEGORIES:
            raise InputError(
                f"{file}: ticket {ticket.id}: category {label!r} is not one of {CATEGORIES} "
                "(map dataset labels with --map FILE.json)"
            )
        urgency = row.get(urgency_field) if urgency_field else None
        if urgency is not None and urgency not in URGENCIES:
            raise InputError(f"{file}: ticket {ticket.id}: urgency {urgency!r} not in {URGENCIES}")
        entities = row.get("entities") if isinstance(row.get("entities"), dict) else None
        if entities is None:
            entities = {k: row[k] or None for k in ENTITY_FIELDS if k in row} or None
        tickets.append(ticket)
        golds.append(Gold(ticket.text, category, urgency, entities))
        if limit is not None and len(tickets) >= limit:
            break
    return tickets, golds, str(file)


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m, b, others = report["model"], report["keyword_baseline"], report.get("others", {})
    table = Table(title=f"triage eval: {report['tickets']} tickets, {report['source']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("keyword baseline", justify="right")
    for name in others:
        table.add_column(name, justify="right")

    def fmt(value):
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    for key in ("category_accuracy", "category_macro_f1", "urgency_accuracy"):
        extra = [fmt(o.get(key)) for o in others.values()]
        table.add_row(key, fmt(m[key]), fmt(b[key]), *extra)
    for name, scores in m["entities"].items():
        table.add_row(
            f"entity {name} P / R", f"{fmt(scores['precision'])} / {fmt(scores['recall'])}", ""
        )
    for key in (
        "json_validity",
        "rule_validity",
        "hallucinated_entity_rate",
        "mean_latency_s",
        "mean_attempts",
        "wall_s",
    ):
        table.add_row(key, fmt(m.get(key)), "")
    Console().print(table)
    coverage = report.get("category_coverage")
    narrowed = "none" if coverage is None else f"classifier, coverage {coverage}"
    typer.echo(
        f"model: {report['model_name']} (few-shot: {report['few_shot']}; category enum "
        f"narrowed by: {narrowed})"
    )
    typer.echo(f"confusion matrix: {report['confusion_png']}")


@triage_app.command("bench")
@with_triager_options
def bench_command(
    tickets: int = typer.Option(100, "--tickets", help="Held-out tickets to triage"),
    sequential: int | None = typer.Option(
        None, "--sequential", help="Time this many one at a time (default: all; fewer = estimate)"
    ),
    as_json: bool = typer.Option(False, "--json"),
    options: TriagerOptions | None = None,
) -> None:
    """N tickets concurrently through the engine vs one at a time, in the same run."""
    from lmstack.triage.dataset import heldout_sample
    from lmstack.triage.schema import Ticket

    if tickets < 1:
        raise InputError(f"--tickets must be >= 1, got {tickets}")
    sequential = tickets if sequential is None else sequential
    if not 1 <= sequential <= tickets:
        raise InputError(f"--sequential must be in [1, {tickets}], got {sequential}")
    held = heldout_sample(tickets)[-tickets:]
    if tickets > len(held):
        raise InputError(f"--tickets {tickets}: the held-out split has {len(held)} tickets")
    chosen = [Ticket(subject=t.subject, body=t.body, id=t.id) for t in held]
    triager = make_triager(options)
    triager.triage(chosen[0])  # warm-up: grammar tokenizer, kernels, prefix cache
    started = time.monotonic()
    triage_in_batches(triager, chosen, "concurrent")
    concurrent_s = time.monotonic() - started
    started = time.monotonic()
    for ticket in chosen[:sequential]:
        triager.triage(ticket)
    sequential_s = (time.monotonic() - started) * tickets / sequential
    result = {
        "tickets": tickets,
        "concurrent_s": round(concurrent_s, 2),
        "sequential_s": round(sequential_s, 2),
        "sequential_measured": sequential,
        "sequential_estimated": sequential < tickets,
        "speedup": round(sequential_s / concurrent_s, 2),
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    note = "" if sequential == tickets else f" (estimated from {sequential})"
    typer.echo(
        f"{tickets} tickets: concurrent {concurrent_s:.1f} s, one at a time "
        f"{sequential_s:.1f} s{note}; speedup {result['speedup']:.2f}x"
    )
