"""One way to configure a Triager, shared by `lmstack triage` and `POST /v1/triage`.

The CLI and the server used to decide by different rules (the server never narrowed the
category to the classifier's plausible classes and ignored the adapter's few-shot flag);
both now take the shipped best configuration from here, and the CLI's options only
override it.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.errors import InputError


def is_tuned(model: str | Path | None) -> bool:
    """Whether `model` is a directory merged from the triage adapter."""
    return model is not None and (Path(model) / "triage_adapter.json").is_file()


def triage_config(
    tuned: bool,
    *,
    max_retries: int = 2,
    examples: str | None = None,
    no_examples: bool = False,
    few_shot: bool | None = None,
    classifier="shipped",
    category_coverage: float | None = None,
):
    """The TriageConfig for a model (`tuned`: merged from the adapter) and the options given.

    Few-shot examples: the base model needs them; the adapter says whether it was trained
    with them. `classifier` is "shipped", None (off) or a CategoryClassifier;
    `category_coverage` defaults to the classifier's measured best (DEFAULT_COVERAGE)."""
    from lmstack.triage.adapter import adapter_info
    from lmstack.triage.classifier import DEFAULT_COVERAGE, shipped_classifier
    from lmstack.triage.prompt import load_examples
    from lmstack.triage.triage import TriageConfig

    if max_retries < 0:
        raise InputError(f"--max-retries must be >= 0, got {max_retries}")
    coverage = DEFAULT_COVERAGE if category_coverage is None else category_coverage
    if not 0.0 <= coverage <= 1.0:
        raise InputError(f"--category-coverage must be in [0, 1], got {coverage}")
    if few_shot is None:
        few_shot = (adapter_info() or {}).get("few_shot", False) if tuned else True
    use_examples = bool(examples) or (few_shot and not no_examples)
    return TriageConfig(
        max_retries=max_retries,
        examples=load_examples(examples) if use_examples else [],
        use_examples=use_examples,
        classifier=shipped_classifier() if classifier == "shipped" else classifier,
        category_coverage=coverage,
    )
