"""Fixtures that more than one test folder uses; a fixture that one folder uses lives there.

tests/ mirrors lmstack/: tests/<part>/ tests lmstack/<part>/ (model, kernels, engine, server,
docqa, triage, align, bench); tests/core/ tests lmstack's top-level modules (llm, plan,
explain, the composition root and its page); tests/repo/ checks the repository as a whole
(the import rule, the documentation, the monitoring kit); tests/hardening/ attacks the
assembled product across layers. helpers.py is importable from every folder
(`pythonpath = ["tests"]` in pyproject.toml), and modules are imported by path
(`--import-mode=importlib`), so two folders may hold modules of the same name.

The bundled model is loaded once per session (`model`); engines and browsers are per module,
as each module configures the server around them differently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ARTIFACTS, chromium

# The converted model cache survives across runs; CI points it inside the clone.
os.environ.setdefault("LMSTACK_CACHE", str(Path.home() / ".cache" / "lmstack"))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def model():
    """(LlamaForCausalLM in fp32, Tokenizer) for the bundled SmolLM2-135M-Instruct."""
    from lmstack.model.llama import shared_model

    return shared_model("bundled", "float32")


@pytest.fixture(scope="module")
def engine():
    """An AsyncLLMEngine on the bundled model with room for 8,192 KV tokens, one per module:
    the server, document-route and hardening modules each build their app around it. A module
    that needs another engine (tests/engine, tests/hardening/test_engine_failure.py) defines
    its own `engine`, which pytest prefers."""
    from lmstack.engine.async_engine import AsyncLLMEngine

    eng = AsyncLLMEngine(num_kv_tokens=8192)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for the page tests (tests/core, tests/align); screenshots go to
    test-artifacts/. Skips without a browser, fails under CI=true (see helpers.chromium)."""
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as launched:
        yield launched
