"""`lmstack triage ...`: one ticket, a file of tickets, eval, bench, train, model.

    lmstack triage --subject S --body B        # one ticket (or pipe it on stdin)
    lmstack triage tickets.csv --out out.jsonl # a CSV/JSONL file, concurrently
    lmstack triage eval [FILE] ...             # metrics vs the keyword baseline
    lmstack triage bench --tickets 100         # concurrent vs one at a time
    lmstack triage train                       # LoRA SFT -> the shipped adapter
    lmstack triage train-classifier            # category head -> the shipped classifier
    lmstack triage model                       # path of the merged fine-tuned model

`run` is the default command: anything that is not a sub-command name goes to it, so
`lmstack triage FILE` and `lmstack triage --subject ...` work as the issue spells them.
eval and bench live in cli_eval.py, the training commands in cli_train.py; the shared
options and the app in cli_common.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from lmstack.errors import InputError
from lmstack.triage import cli_eval, cli_train  # noqa: F401  (they register their commands)
from lmstack.triage.cli_common import (
    TriagerOptions,
    make_triager,
    triage_app,
    triage_in_batches,
    with_triager_options,
)

__all__ = ["triage_app"]


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
@with_triager_options
def run_command(
    file: Path | None = typer.Argument(None, help="CSV or JSONL of tickets", show_default=False),
    subject: str | None = typer.Option(None, "--subject", help="One ticket's subject"),
    body: str | None = typer.Option(None, "--body", help="One ticket's body"),
    subject_field: str | None = typer.Option(None, "--subject-field", help="Default: subject"),
    body_field: str = typer.Option("body", "--body-field"),
    id_field: str | None = typer.Option(None, "--id-field", help="Default: id, else line"),
    out: Path | None = typer.Option(None, "--out", help="Write JSONL here (default: stdout)"),
    redact: bool = typer.Option(
        False,
        "--redact",
        help="Placeholders for e-mails, phones, card numbers and customer IDs in the key "
        "issue, reply, errors and warnings (the entities keep the values)",
    ),
    options: TriagerOptions | None = None,
) -> None:
    """Triage one ticket (--subject/--body or stdin) or a CSV/JSONL file (the default).

    Card numbers never appear in a reply, with or without --redact."""
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

        triager = make_triager(options, redact=redact)
        record = triager.triage(Ticket(subject=subject, body=body))
        for warning in record.warnings:
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(record.model_dump_json(indent=2))
        return

    from lmstack.triage.inputs import read_tickets

    loaded = read_tickets(file, subject_field, body_field, id_field)
    for problem in loaded.problems:
        typer.echo(f"warning: {problem}", err=True)
    triager = make_triager(options, redact=redact)
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


@triage_app.command("model")
def model_command() -> None:
    """Print the merged fine-tuned model directory (for `lmstack serve --model ...`)."""
    from lmstack.triage.adapter import triage_model

    merged = triage_model()
    if merged is None:
        raise InputError("no triage adapter is shipped; run `lmstack triage train`")
    typer.echo(str(merged))
