"""Helpers the `lmstack align` command modules share."""

from __future__ import annotations

import json

import typer

from lmstack.errors import InputError


def echo_report(report) -> None:
    """What reading a file skipped, on stderr (stdout belongs to --json output)."""
    if report.skipped:
        typer.echo(report.summary(), err=True)


def dump(data: dict) -> None:
    typer.echo(json.dumps(data, indent=2))


def numbers(text: str, kind, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InputError(f"{option} takes comma-separated numbers, got {text!r}") from exc
