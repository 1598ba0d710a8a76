"""Model files for the apps' training and ingestion code.

Apps (docqa, triage, align) reach a model for inference through `lmstack.llm`; when they
need the files themselves (a Hugging Face directory to fine-tune, the tokenizer to count
tokens, raw weights to merge an adapter into) they come here, never to `lmstack.model`, so
the model's internals can change without touching an app.
"""

from __future__ import annotations

import os
from pathlib import Path


def model_dir(model: str | os.PathLike | None = None) -> Path:
    """A Hugging Face directory (config.json + safetensors + tokenizer) for `model`:
    'bundled' or None (the bundled GGUF, converted once and cached), a .gguf file, or a
    local HF directory as it is."""
    from lmstack.model.weights import resolve_model

    return resolve_model(model)


def tokenizer(model: str | os.PathLike | None = None):
    """lmstack's tokenizer for `model` (the one the engine uses: chat template, stream
    decoding, special tokens)."""
    from lmstack.model.tokenizer import Tokenizer

    return Tokenizer(model_dir(model))


def state_dict(directory: str | os.PathLike) -> dict:
    """The weights of an HF directory as {name: tensor}, every safetensors shard read."""
    from lmstack.model.weights import load_state_dict

    return load_state_dict(Path(directory))
