"""What the `lmstack triage` commands share: the app, the triager options, batching.

The options that choose and configure the triager (--model, --dtype, --llm-url,
--max-retries, --examples, --no-examples, --category-coverage, --no-classifier) are declared
once, in `TRIAGER_OPTIONS`; a command decorated with `@with_triager_options` gets all of
them on its command line and receives them as one `TriagerOptions` argument, which
`make_triager` turns into a Triager.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields

import typer
from typer.core import TyperGroup

from lmstack.extras import require
from lmstack.triage.classifier import DEFAULT_COVERAGE


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


@triage_app.callback()
def _needs_triage() -> None:
    # The category classifier embeds tickets and training needs peft: name the extra first.
    require("triage", "lmstack triage")


BATCH = 128  # tickets in flight at once: below the engine's waiting-queue bound


@dataclass
class TriagerOptions:
    model: str | None = None
    dtype: str = "auto"
    llm_url: str | None = None
    max_retries: int = 2
    examples: str | None = None
    no_examples: bool = False
    category_coverage: float = DEFAULT_COVERAGE
    no_classifier: bool = False


TRIAGER_OPTIONS = {
    "model": typer.Option(
        None, "--model", help="HF dir or 'bundled' (default: bundled + the shipped triage adapter)"
    ),
    "dtype": typer.Option(
        "auto",
        "--dtype",
        help="auto (chosen for this CPU), float32, bfloat16, int8, gguf, q4_1, q4_0 or q8_0",
    ),
    "llm_url": typer.Option(None, "--llm-url", help="Use an OpenAI-compatible server instead"),
    "max_retries": typer.Option(2, "--max-retries", help="Retries with the validator's errors"),
    "examples": typer.Option(
        None, "--examples", help="Few-shot examples JSONL (default: shipped ones, base model only)"
    ),
    "no_examples": typer.Option(False, "--no-examples", help="No few-shot examples"),
    "category_coverage": typer.Option(
        DEFAULT_COVERAGE,
        "--category-coverage",
        help="The category enum keeps the classifier's top classes until they hold this much "
        "probability (0: the classifier decides alone; 1: every class)",
    ),
    "no_classifier": typer.Option(
        False, "--no-classifier", help="No category classifier: the language model decides"
    ),
}


def with_triager_options(command):
    """Add TRIAGER_OPTIONS to `command`'s CLI; it receives them as `options: TriagerOptions`."""
    hints = typing.get_type_hints(command)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(command).parameters.values()
        if p.name != "options"
    ]
    names = [f.name for f in fields(TriagerOptions)]
    option_hints = typing.get_type_hints(TriagerOptions)
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=TRIAGER_OPTIONS[name],
            annotation=option_hints[name],
        )
        for name in names
    ]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = TriagerOptions(**{name: kwargs.pop(name) for name in names})
        return command(*args, options=options, **kwargs)

    params = own + added
    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must see the new signature, not the original's
    return wrapper


def make_triager(
    options: TriagerOptions | None = None, few_shot: bool | None = None, redact: bool = False
):
    """A Triager with the best shipped configuration unless the options say otherwise;
    `redact`: PII placeholders in the records' prose (TriageConfig.redact)."""
    from lmstack.llm import make_generator
    from lmstack.triage.adapter import triage_model
    from lmstack.triage.builder import is_tuned, triage_config
    from lmstack.triage.triage import Triager

    o = options or TriagerOptions()
    config_options = {
        "max_retries": o.max_retries,
        "examples": o.examples,
        "no_examples": o.no_examples,
        "few_shot": few_shot,
        "category_coverage": o.category_coverage,
    }
    triage_config(False, classifier=None, **config_options)  # bad options: before any load
    model = o.model
    if o.llm_url:
        generator = make_generator(llm_url=o.llm_url, model=model)
        tuned = False
    else:
        if model is None:
            merged = triage_model()
            model, tuned = (str(merged), True) if merged else ("bundled", False)
        else:
            tuned = is_tuned(model)
        generator = make_generator(model=model, dtype=o.dtype, num_kv_tokens=32768)
    classifier = None if o.no_classifier else "shipped"
    config = triage_config(tuned, classifier=classifier, **config_options)
    config.redact = redact
    return Triager(generator, config)


def progress_bar(label: str):
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
    with progress_bar(label) as bar:
        task = bar.add_task(label, total=len(tickets))
        for start in range(0, len(tickets), BATCH):
            chunk = tickets[start : start + BATCH]
            records += triager.triage_many(chunk, on_done=lambda i, r: bar.advance(task))
    return records
