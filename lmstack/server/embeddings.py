"""`POST /v1/embeddings` in OpenAI's shape, on the sentence embedder the apps already load.

The server knows the embedder only by what it does (`embed`, `count_tokens`, `decode`,
`max_input_tokens`, `vocab_size`, `dimension`, `model_id`: lmstack.embed.Embedder); the
composition root (lmstack/serve.py) creates it and passes it to `create_app`, and without
one this route and its /v1/models entry are absent.

`input` is a string, a list of strings, a list of token ids or a list of such lists; ids
are the embedder's own tokenizer's (not the chat model's) and are decoded with it. Every
input is checked before anything runs, each refusal a 400 naming the input and the limit:
more inputs than --max-embedding-inputs, an input longer than --max-embedding-input-tokens
(the model's own maximum by default: the embedder would silently cut the rest), an empty
input, an id outside the vocabulary, `dimensions` other than the model's. Validation and
token counting run on a worker thread, the forward pass on the batcher's
(lmstack.server.embed_batcher), so the event loop never tokenizes a large body or runs the
model.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import StrictInt

from lmstack.errors import InputError
from lmstack.httpapi import APIError, parse_body
from lmstack.server import protocol as p
from lmstack.server.embed_batcher import EmbeddingBatcher
from lmstack.server.limits import flag, over_limit
from lmstack.server.metrics import EmbeddingMetrics
from lmstack.server.state import ServerState

# OpenAI's own bound on the inputs of one request.
DEFAULT_MAX_INPUTS = 2048


@dataclass(frozen=True)
class EmbeddingLimits:
    """`lmstack serve --max-embedding-inputs`, `--max-embedding-input-tokens`."""

    max_embedding_inputs: int = DEFAULT_MAX_INPUTS
    # Tokens per input, [CLS] and [SEP] included. None: all the model reads (256 for MiniLM).
    max_embedding_input_tokens: int | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name == "max_embedding_input_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{flag(field.name)} must be an integer >= 1, got {value!r}")

    def resolved(self, model_id: str, model_max: int) -> EmbeddingLimits:
        given = self.max_embedding_input_tokens
        if given is not None and given > model_max:
            raise InputError(
                f"--max-embedding-input-tokens is {given}, but {model_id} reads at most "
                f"{model_max} tokens: it would truncate longer inputs"
            )
        return dataclasses.replace(self, max_embedding_input_tokens=given or model_max)


class EmbeddingRequest(p.RequestModel):
    model: str | None = None
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None


@dataclass
class Prepared:
    texts: list[str]
    tokens: list[int]  # per input, as the embedder counts them


class EmbeddingService:
    """What /v1/embeddings and /v1/models need: the embedder, its batcher, limits, metrics."""

    def __init__(self, embedder, limits: EmbeddingLimits, metrics: EmbeddingMetrics) -> None:
        self.embedder = embedder
        self.model_id: str = embedder.model_id
        self.limits = limits.resolved(self.model_id, embedder.max_input_tokens)
        self.metrics = metrics
        self.batcher = EmbeddingBatcher(embedder, metrics)

    def card(self, created: int) -> p.ModelCard:
        dtype = "bfloat16" if getattr(self.embedder, "bf16", False) else "float32"
        return p.ModelCard(
            id=self.model_id,
            created=created,
            root=self.model_id,
            max_model_len=self.limits.max_embedding_input_tokens,
            dtype=dtype,
        )

    def check_model(self, model: str | None, chat_model: str) -> None:
        if model is None or model == self.model_id:
            return
        if model == chat_model:
            raise APIError(
                400,
                f"model {model!r} generates text and does not embed; /v1/embeddings serves "
                f"{self.model_id!r}",
                param="model",
                code="model_not_embedding",
            )
        raise APIError(
            404,
            f"model {model!r} does not exist; /v1/embeddings serves {self.model_id!r}",
            param="model",
            code="model_not_found",
        )

    def check_dimensions(self, dimensions: int | None) -> None:
        native = self.embedder.dimension
        if dimensions is not None and dimensions != native:
            raise APIError(
                400,
                f"dimensions is {dimensions}, but {self.model_id} only gives {native}-dimensional "
                f"vectors: leave dimensions out or pass {native}",
                param="dimensions",
            )

    def prepare(self, body: EmbeddingRequest) -> Prepared:
        """Every input as text with its token count, or the first problem as a 400."""
        raw = body.input
        single = isinstance(raw, str) or (bool(raw) and isinstance(raw[0], int))
        items = [raw] if single else list(raw)
        if not items:
            raise APIError(400, "input is an empty list: give at least one input", param="input")
        limit = self.limits.max_embedding_inputs
        if len(items) > limit:
            error = over_limit("the number of inputs", len(items), "max_embedding_inputs", limit)
            raise APIError(400, str(error), param="input")
        vocab = self.embedder.vocab_size
        texts = []
        for i, item in enumerate(items):
            where = "input" if single else f"input[{i}]"
            if isinstance(item, str):
                text = item
            else:
                if not item:
                    raise APIError(400, f"{where} is an empty list of token ids", param=where)
                bad = next((t for t in item if not 0 <= t < vocab), None)
                if bad is not None:
                    raise APIError(
                        400,
                        f"{where} holds the token id {bad}, outside the vocabulary of "
                        f"{self.model_id}'s tokenizer [0, {vocab})",
                        param=where,
                    )
                text = self.embedder.decode(item)
            if not text:
                what = "an empty string" if isinstance(item, str) else "only special tokens"
                raise APIError(400, f"{where} is {what}: nothing to embed", param=where)
            texts.append(text)
        tokens = self.embedder.count_tokens(texts)
        most = self.limits.max_embedding_input_tokens
        for i, count in enumerate(tokens):
            if count > most:
                where = "input" if single else f"input[{i}]"
                name = "max_embedding_input_tokens"
                error = over_limit(f"the length of {where} in tokens", count, name, most)
                raise APIError(
                    400, f"{error}; longer inputs are refused, not truncated", param=where
                )
        return Prepared(texts, tokens)

    async def respond(self, body: EmbeddingRequest, record) -> dict:
        prepared = await asyncio.to_thread(self.prepare, body)
        started = time.perf_counter()
        vectors = await self.batcher.embed(prepared.texts)
        self.metrics.latency.observe(time.perf_counter() - started)
        total = sum(prepared.tokens)
        self.metrics.requests.inc()
        self.metrics.inputs.inc(len(prepared.texts))
        self.metrics.prompt_tokens.inc(total)
        if record is not None:
            record.prompt_tokens = total
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(row, body.encoding_format)}
                for i, row in enumerate(vectors)
            ],
            "model": self.model_id,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }


def encode(row: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as JSON floats, or as OpenAI's base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.astype(np.float32).tolist()


def add_embedding_routes(app: FastAPI, state: ServerState, service: EmbeddingService) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await parse_body(request, EmbeddingRequest)
        service.check_model(body.model, state.served_model_name)
        service.check_dimensions(body.dimensions)
        record = request.scope.get("lmstack.record")
        return JSONResponse(await service.respond(body, record))
