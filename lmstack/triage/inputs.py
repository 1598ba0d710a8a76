"""Reading tickets from CSV or JSONL files, with errors that name lines and columns.

A CSV without the named columns is refused up front (naming the missing ones and the ones
it has). A JSONL line that is not a JSON object, or lacks the body field, is reported by
line number and skipped; the rest is processed. Bytes that are not UTF-8 are replaced
(U+FFFD) with a warning naming the first bad line, rather than refusing the whole file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.errors import InputError
from lmstack.triage.schema import Ticket


@dataclass
class TicketFile:
    tickets: list[Ticket]
    rows: list[dict]  # the raw rows, for evaluation labels
    problems: list[str] = field(default_factory=list)  # skipped lines and other warnings


def decode(raw: bytes, where: str) -> tuple[str, list[str]]:
    """UTF-8 text (BOM dropped); undecodable bytes become U+FFFD with a warning."""
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        text = raw.decode("utf-8-sig", errors="replace")
        return text, [f"{where}: bytes that are not UTF-8 (first on line {line}) were replaced"]


def read_tickets(
    path: str | Path,
    subject_field: str | None = None,
    body_field: str = "body",
    id_field: str | None = None,
) -> TicketFile:
    """Tickets from a .csv or .jsonl/.json file; subject/id fields are optional if absent."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    text, problems = decode(raw, str(path))
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(text, path, subject_field, body_field, id_field)
        numbered = [(i + 2, row) for i, row in enumerate(rows)]  # line 1 is the header
    elif suffix in (".jsonl", ".json", ".ndjson"):
        numbered = _jsonl_rows(text, path, problems)
    else:
        raise InputError(f"{path}: expected a .csv or .jsonl file, got {suffix or 'no suffix'!r}")
    tickets, kept = [], []
    for line, row in numbered:
        body = row.get(body_field)
        subject = row.get(subject_field or "subject")
        if subject_field and subject_field not in row and suffix != ".csv":
            problems.append(f"{path}: line {line}: no {subject_field!r} field; skipped")
            continue
        if body is None and suffix != ".csv":
            problems.append(f"{path}: line {line}: no {body_field!r} field; skipped")
            continue
        ident = row.get(id_field or "id")
        tickets.append(
            Ticket(
                subject=_text(subject),
                body=_text(body),
                id=str(ident) if ident not in (None, "") else str(line),
            )
        )
        kept.append(row)
    if not tickets and not problems:
        raise InputError(f"{path}: no tickets in the file")
    return TicketFile(tickets, kept, problems)


def _text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _csv_rows(text, path, subject_field, body_field, id_field) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    wanted = [body_field] + [f for f in (subject_field, id_field) if f]
    missing = [name for name in wanted if name not in columns]
    if missing:
        raise InputError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} (the file has {', '.join(columns) or 'none'}; "
            "choose with --subject-field/--body-field/--id-field)"
        )
    try:
        return list(reader)
    except csv.Error as exc:
        raise InputError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from exc


def _jsonl_rows(text, path, problems) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}: line {number}: not valid JSON ({exc.msg}); skipped")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}: line {number}: expected a JSON object; skipped")
            continue
        rows.append((number, row))
    return rows
