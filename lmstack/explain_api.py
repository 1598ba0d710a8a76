"""`POST /v1/attention`: attention weights for the web page's heatmaps.

    {"text": "..."}                      the served model's causal attention on the text:
                                         weights[layer][head][query][key], every layer/head
    {"causal": false, "heads": 1}        (no text) the worked example, "The cat sat", with
                                         every step (scores, scaled, weights, output)

The numbers come from `reference_attention`, the reference the model's fast path is tested
against, on the q/k/v the model itself computed (`explain.RecordingContext`). The fp32 copy
of the model (`shared_model`) loads on the first request with a text.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from lmstack.errors import InputError

# 30 layers x 9 heads x T^2 weights: 32 tokens is about 280,000 numbers (2 MB of JSON).
MAX_ATTENTION_TOKENS = 32
_lock = threading.Lock()  # one forward pass at a time: the CPU is shared with serving


class AttentionRequest(BaseModel):
    text: str | None = None
    causal: bool = False
    heads: int = 1


def _rounded(t) -> list:
    return (t.double() * 10_000).round().div(10_000).tolist()


def worked_example(causal: bool, heads: int) -> dict:
    from lmstack.explain import practice_example, steps_to_json

    example = practice_example()
    width = example.x.shape[1]
    if heads < 1 or width % heads:
        choices = [h for h in range(1, width + 1) if width % h == 0]
        raise InputError(f"heads must divide the example's width {width} ({choices}), got {heads}")
    steps = example.steps(causal=causal, heads=heads)
    return {
        "source": "example",
        "tokens": example.tokens,
        "layers": 1,
        "heads": heads,
        "kv_heads": heads,
        "d_k": steps.d_k,
        "causal": causal,
        "weights": [_rounded(steps.weights)],
        "steps": steps_to_json(steps, example.tokens),
    }


def model_attention_all(model, tokenizer, text: str) -> dict:
    """Every layer's and head's causal attention weights of the model on `text`."""
    import torch

    from lmstack.explain import RecordingContext, token_labels
    from lmstack.model.attention import reference_attention

    cfg = model.config
    ids = tokenizer.encode(text)
    if not ids:
        raise InputError("text is empty: give a sentence to run through the model")
    if len(ids) > MAX_ATTENTION_TOKENS:
        raise InputError(
            f"text is {len(ids)} tokens; the heatmaps take at most {MAX_ATTENTION_TOKENS}"
        )
    layers = cfg.num_hidden_layers
    ctx = RecordingContext(range(layers))
    with torch.inference_mode():
        model(torch.tensor(ids), torch.arange(len(ids)), ctx)
        weights = [
            _rounded(
                reference_attention(
                    ctx.records[n]["q"], ctx.records[n]["k"], ctx.records[n]["v"], causal=True
                ).weights
            )
            for n in range(layers)
        ]
    return {
        "source": "model",
        "tokens": token_labels(tokenizer, ids),
        "layers": layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "d_k": cfg.hidden_size // cfg.num_attention_heads,
        "causal": True,
        "weights": weights,
    }


def attention_router(model_name: str = "bundled") -> APIRouter:
    """POST /v1/attention over `model_name` (its fp32 copy, loaded on first use)."""
    from lmstack.httpapi import parse_body

    router = APIRouter()

    def compute(body: AttentionRequest) -> dict:
        if body.text is None:
            return worked_example(body.causal, body.heads)
        from lmstack.model.llama import shared_model

        with _lock:
            model, tokenizer = shared_model(model_name, "float32")
            return model_attention_all(model, tokenizer, body.text)

    @router.post("/v1/attention")
    async def attention(request: Request):
        body = await parse_body(request, AttentionRequest)
        return await run_in_threadpool(compute, body)

    return router
