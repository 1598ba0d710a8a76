"""`lmstack triage ...`: one ticket, a file of tickets, eval, bench, train, model.

    lmstack triage --subject S --body B        # one ticket (or pipe it on stdin)
    lmstack triage tickets.csv --out out.jsonl # a CSV/JSONL file, concurrently
    lmstack triage eval [FILE] ...             # metrics vs the keyword baseline
    lmstack triage bench --tickets 100         # concurrent vs one at a time
    lmstack triage train                       # LoRA SFT -> the shipped adapter
    lmstack triage model                       # path of the merged fine-tuned model

`run` is the default command: anything that is not a sub-command name goes to it, so
`lmstack triage FILE` and `lmstack triage --subject ...` work as the issue spells them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from typer.core import TyperGroup

from lmstack.errors import InputError


class _DefaultRun(TyperGroup):
    """A group whose unknown first word (a FILE, an option) goes to the `run` command."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


triage_app = typer.Typer(
    cls=_DefaultRun,
    help="Support-ticket triage: category, urgency, entities, summary and reply as JSON.",
)

BATCH = 128  # tickets in flight at once: below the engine's waiting-queue bound

_model_opt = typer.Option(
    None, "--model", help="HF dir or 'bundled' (default: bundled + the shipped triage adapter)"
)
_dtype_opt = typer.Option("bfloat16", "--dtype", help="float32, bfloat16 or int8")
_url_opt = typer.Option(None, "--llm-url", help="Use an OpenAI-compatible server instead")
_retries_opt = typer.Option(2, "--max-retries", help="Retries with the validator's errors")
_examples_opt = typer.Option(
    None, "--examples", help="Few-shot examples JSONL (default: shipped ones, base model only)"
)
_no_examples_opt = typer.Option(False, "--no-examples", help="No few-shot examples")


def make_triager(
    model: str | None = None,
    dtype: str = "bfloat16",
    llm_url: str | None = None,
    max_retries: int = 2,
    examples: str | None = None,
    no_examples: bool = False,
    few_shot: bool | None = None,
):
    """A Triager with the best shipped configuration unless told otherwise."""
    from lmstack.llm import make_generator
    from lmstack.triage.adapter import adapter_info, triage_model
    from lmstack.triage.prompt import load_examples
    from lmstack.triage.triage import TriageConfig, Triager

    if max_retries < 0:
        raise InputError(f"--max-retries must be >= 0, got {max_retries}")
    if llm_url:
        generator = make_generator(llm_url=llm_url, model=model)
        tuned = False
    else:
        if model is None:
            merged = triage_model()
            model, tuned = (str(merged), True) if merged else ("bundled", False)
        else:
            tuned = (Path(model) / "triage_adapter.json").is_file()
        generator = make_generator(model=model, dtype=dtype, num_kv_tokens=32768)
    if few_shot is None:
        # The adapter was trained zero-shot; the base model needs the examples.
        few_shot = (adapter_info() or {}).get("few_shot", False) if tuned else True
    use_examples = bool(examples) or (few_shot and not no_examples)
    config = TriageConfig(
        max_retries=max_retries,
        examples=load_examples(examples) if use_examples else [],
        use_examples=use_examples,
    )
    return Triager(generator, config)


def _progress(total: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(
        f"[bold]{label}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def triage_in_batches(triager, tickets, label: str = "triage"):
    """All tickets through the engine, BATCH at a time, with a progress bar on stderr."""
    records = []
    with _progress(len(tickets), label) as bar:
        task = bar.add_task(label, total=len(tickets))
        for start in range(0, len(tickets), BATCH):
            chunk = tickets[start : start + BATCH]
            records += triager.triage_many(chunk, on_done=lambda i, r: bar.advance(task))
    return records


def _read_stdin() -> tuple[str, str]:
    from lmstack.triage.inputs import decode

    text, problems = decode(sys.stdin.buffer.read(), "stdin")
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    subject, _, rest = text.partition("\n")
    if subject.lower().startswith("subject:"):
        return subject[len("subject:") :].strip(), rest.strip()
    return "", text.strip()


@triage_app.command("run")
def run_command(
    file: Path | None = typer.Argument(None, help="CSV or JSONL of tickets", show_default=False),
    subject: str | None = typer.Option(None, "--subject", help="One ticket's subject"),
    body: str | None = typer.Option(None, "--body", help="One ticket's body"),
    subject_field: str | None = typer.Option(None, "--subject-field", help="Default: subject"),
    body_field: str = typer.Option("body", "--body-field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: id, else line"),
    out: Path | None = typer.Option(None, "--out", help="Write JSONL here (default: stdout)"),
    model: str | None = _model_opt,
    dtype: str = _dtype_opt,
    llm_url: str | None = _url_opt,
    max_retries: int = _retries_opt,
    examples: str | None = _examples_opt,
    no_examples: bool = _no_examples_opt,
) -> None:
    """Triage one ticket (--subject/--body or stdin) or a CSV/JSONL file (the default)."""
    if file is not None and (subject is not None or body is not None):
        raise InputError("give either FILE or --subject/--body, not both")
    if file is None:
        if subject is None and body is None:
            if sys.stdin.isatty():
                raise InputError("give --subject/--body, a FILE, or pipe a ticket on stdin")
            subject, body = _read_stdin()
        subject, body = subject or "", body or ""
        if not subject.strip() and not body.strip():
            raise InputError("the ticket is empty: --subject and --body are both empty")
        from lmstack.triage.schema import Ticket

        triager = make_triager(model, dtype, llm_url, max_retries, examples, no_examples)
        record = triager.triage(Ticket(subject=subject, body=body))
        for warning in record.warnings:
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(record.model_dump_json(indent=2))
        return

    from lmstack.triage.inputs import read_tickets

    loaded = read_tickets(file, subject_field, body_field, id_field)
    for problem in loaded.problems:
        typer.echo(f"warning: {problem}", err=True)
    triager = make_triager(model, dtype, llm_url, max_retries, examples, no_examples)
    started = time.monotonic()
    records = triage_in_batches(triager, loaded.tickets)
    wall = time.monotonic() - started
    lines = [r.model_dump_json() for r in records]
    if out:
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        for line in lines:
            typer.echo(line)
    for record in records:
        for warning in record.warnings:
            typer.echo(f"warning: ticket {record.id}: {warning}", err=True)
    valid = sum(r.valid for r in records)
    typer.echo(
        f"{len(records)} tickets in {wall:.1f} s: {valid} valid, {len(records) - valid} with "
        f"errors, {len(loaded.problems)} input problems" + (f"; wrote {out}" if out else ""),
        err=True,
    )


@triage_app.command("eval")
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
    model: str | None = _model_opt,
    dtype: str = _dtype_opt,
    llm_url: str | None = _url_opt,
    max_retries: int = _retries_opt,
    examples: str | None = _examples_opt,
    no_examples: bool = _no_examples_opt,
) -> None:
    """Category/urgency/entity metrics, validity and latency, vs the keyword baseline."""
    from lmstack.triage.evaluate import evaluate, plot_confusion

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    tickets, golds, source = _eval_set(
        file, category_field, urgency_field, label_map, subject_field, body_field, limit
    )
    triager = make_triager(model, dtype, llm_url, max_retries, examples, no_examples)
    started = time.monotonic()
    records = triage_in_batches(triager, tickets, "eval")
    report = evaluate(golds, records, time.monotonic() - started)
    report["source"] = source
    report["model_name"] = triager.generator.name
    report["few_shot"] = bool(triager.examples)
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

    m, b = report["model"], report["keyword_baseline"]
    table = Table(title=f"triage eval: {report['tickets']} tickets, {report['source']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("keyword baseline", justify="right")

    def fmt(value):
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    for key in ("category_accuracy", "category_macro_f1", "urgency_accuracy"):
        table.add_row(key, fmt(m[key]), fmt(b[key]))
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
    typer.echo(f"model: {report['model_name']} (few-shot: {report['few_shot']})")
    typer.echo(f"confusion matrix: {report['confusion_png']}")


@triage_app.command("bench")
def bench_command(
    tickets: int = typer.Option(100, "--tickets", help="Held-out tickets to triage"),
    sequential: int | None = typer.Option(
        None, "--sequential", help="Time this many one at a time (default: all; fewer = estimate)"
    ),
    model: str | None = _model_opt,
    dtype: str = _dtype_opt,
    max_retries: int = _retries_opt,
    as_json: bool = typer.Option(False, "--json"),
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
    triager = make_triager(model, dtype, None, max_retries)
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


@triage_app.command("train")
def train_command(
    out: Path = typer.Option(
        Path(__file__).parent / "data" / "adapter", "--out", help="Adapter directory"
    ),
    train_size: int = typer.Option(320, "--train-size", help="Bitext training tickets"),
    epochs: int = typer.Option(1, "--epochs"),
    lr: float = typer.Option(8e-4, "--lr"),
    rank: int = typer.Option(16, "--rank"),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(
        None, "--threads", help="torch threads (1 is fastest on a CPU shared with other work)"
    ),
) -> None:
    """LoRA SFT on the training split (fixed seed and split); writes the adapter."""
    from lmstack.triage.train import TrainConfig, train

    for name, value in (("--train-size", train_size), ("--epochs", epochs), ("--rank", rank)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if lr <= 0:
        raise InputError(f"--lr must be > 0, got {lr}")
    config = TrainConfig(
        train_size=train_size,
        epochs=epochs,
        lr=lr,
        rank=rank,
        alpha=2 * rank,
        seed=seed,
        threads=threads,
    )
    with _progress(0, "train") as bar:
        task = bar.add_task("train", total=None)

        def progress(step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, description=f"loss {loss:.3f}")

        record = train(out, config, progress)
    typer.echo(json.dumps(record, indent=2))


@triage_app.command("model")
def model_command() -> None:
    """Print the merged fine-tuned model directory (for `lmstack serve --model ...`)."""
    from lmstack.triage.adapter import triage_model

    merged = triage_model()
    if merged is None:
        raise InputError("no triage adapter is shipped; run `lmstack triage train`")
    typer.echo(str(merged))
