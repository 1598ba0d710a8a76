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


def shared_data_dir() -> Path:
    """Development data (../shared/data beside the checkout), or $LMSTACK_SHARED_DATA."""
    env = os.environ.get("LMSTACK_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"
