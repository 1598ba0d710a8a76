"""Shared fixtures: the real bundled model, loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The converted model cache survives across runs; CI points it inside the clone.
os.environ.setdefault("LMSTACK_CACHE", str(Path.home() / ".cache" / "lmstack"))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def model():
    """(LlamaForCausalLM in fp32, Tokenizer) for the bundled SmolLM2-135M-Instruct."""
    from lmstack.model.llama import shared_model

    return shared_model("bundled", "float32")
