"""The `lmstack` command. Each capability registers its commands here and nothing else.

Errors caused by the user's input (lmstack.errors.LmstackError) print one line on stderr
and exit with code 2; heavy imports happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import sys

import typer

import lmstack  # noqa: F401  (sets the offline environment before anything else loads)
from lmstack import explain, textgen
from lmstack.align.cli import align_app
from lmstack.bench.cli import bench_app
from lmstack.docqa.cli import ask_command, docs_app
from lmstack.errors import LmstackError
from lmstack.plan_cli import plan_app
from lmstack.serve import serve_command
from lmstack.triage.cli import triage_app

app = typer.Typer(
    name="lmstack",
    help="A self-hosted LLM application stack that runs offline on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("attention")(explain.attention_command)
app.command("generate")(textgen.generate_command)
app.command("chat")(textgen.chat_command)
app.command("serve")(serve_command)
app.add_typer(bench_app, name="bench")
app.add_typer(triage_app, name="triage")
app.add_typer(plan_app, name="plan")
app.add_typer(docs_app, name="docs")
app.command("ask")(ask_command)
app.add_typer(align_app, name="align")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except LmstackError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
