"""Settings shared by every capability: cache directory and defaults (env LMSTACK_*)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models and other derived files live ($LMSTACK_CACHE)."""
    root = os.environ.get("LMSTACK_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lmstack"
    )
    return Path(root)


def default_model() -> str:
    """The model used when --model is not given: the bundled SmolLM2 unless overridden."""
    return os.environ.get("LMSTACK_MODEL", "bundled")


def default_dtype() -> str:
    return os.environ.get("LMSTACK_DTYPE", "auto")


def data_dir() -> Path:
    """The data lmstack ships for benchmarks, tests and training (lmstack/data, see its
    README for sources and licences), or another folder of the same layout ($LMSTACK_DATA)."""
    env = os.environ.get("LMSTACK_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data"
