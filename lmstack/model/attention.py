"""Scaled dot-product attention: a reference that shows every step, and the fast paths.

    Q = X W_Q,  K = X W_K,  V = X W_V
    scores  = Q K^T                 (how well each query matches each key)
    scaled  = scores / sqrt(d_k)    (keeps the softmax out of its flat, saturated regions)
    weights = softmax(scaled)       (row-wise: each token's attention sums to 1)
    output  = weights V             (each token becomes a weighted mix of the values)

`reference_attention` computes these one by one and returns them all; the model runs
`sdpa` (torch's fused kernel) or the paged kernels of the engine, and tests check that both
agree with the reference on real activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmstack.errors import InputError


@dataclass
class AttentionSteps:
    """Every intermediate of one attention computation. Shapes: [heads, tokens, ...]."""

    q: torch.Tensor  # [H, T, d_k]
    k: torch.Tensor  # [H, S, d_k]
    v: torch.Tensor  # [H, S, d_v]
    scores: torch.Tensor  # [H, T, S]  Q K^T
    scaled: torch.Tensor  # [H, T, S]  scores / sqrt(d_k), masked entries = -inf
    weights: torch.Tensor  # [H, T, S]  softmax(scaled) row-wise
    output: torch.Tensor  # [H, T, d_v]
    d_k: int
    causal: bool

    def merged_output(self) -> torch.Tensor:
        """Heads concatenated back to [T, H * d_v], as a multi-head layer returns them."""
        heads, tokens, d_v = self.output.shape
        return self.output.transpose(0, 1).reshape(tokens, heads * d_v)


def causal_mask(num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    """True where query i may attend to key j. Queries are the last `num_queries` tokens."""
    offset = num_keys - num_queries
    q_pos = torch.arange(num_queries, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(num_keys, device=device).unsqueeze(0)
    return k_pos <= q_pos


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[T, H * d] -> [H, T, d]."""
    tokens, width = x.shape
    if width % num_heads:
        raise InputError(f"width {width} is not divisible by --heads {num_heads}")
    return x.reshape(tokens, num_heads, width // num_heads).transpose(0, 1)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> AttentionSteps:
    """Attention step by step on per-head tensors q [H,T,d], k/v [H_kv,S,d].

    With fewer key/value heads than query heads (grouped-query attention) each K/V head
    serves H / H_kv consecutive query heads.
    """
    if q.dim() == 2:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    heads, tokens, d_k = q.shape
    if k.shape[-1] != d_k:
        raise InputError(f"Q has d_k={d_k} but K has {k.shape[-1]}: shapes must match")
    if k.shape[:2] != v.shape[:2]:
        raise InputError(f"K {tuple(k.shape)} and V {tuple(v.shape)} differ in heads or length")
    if heads % k.shape[0]:
        raise InputError(f"{heads} query heads cannot share {k.shape[0]} key/value heads")
    group = heads // k.shape[0]
    k_full = k.repeat_interleave(group, dim=0)
    v_full = v.repeat_interleave(group, dim=0)
    scores = q @ k_full.transpose(-1, -2)
    scaled = scores / math.sqrt(d_k)
    if causal:
        scaled = scaled.masked_fill(~causal_mask(tokens, k.shape[1], q.device), float("-inf"))
    weights = torch.softmax(scaled, dim=-1)
    output = weights @ v_full
    return AttentionSteps(q, k_full, v_full, scores, scaled, weights, output, d_k, causal)


def explain(
    x: torch.Tensor,
    w_q: torch.Tensor | None = None,
    w_k: torch.Tensor | None = None,
    w_v: torch.Tensor | None = None,
    *,
    causal: bool = False,
    num_heads: int = 1,
) -> AttentionSteps:
    """Self-attention of token embeddings x [T, d_model] with projections W [d_model, d]."""
    if x.dim() != 2:
        raise InputError(f"embeddings must be a [tokens, dim] matrix, got shape {tuple(x.shape)}")
    d_model = x.shape[1]
    eye = torch.eye(d_model, dtype=x.dtype)
    projections = []
    for name, w in (("W_Q", w_q), ("W_K", w_k), ("W_V", w_v)):
        w = eye if w is None else w
        if w.dim() != 2 or w.shape[0] != d_model:
            raise InputError(
                f"{name} has shape {tuple(w.shape)}; it must have {d_model} rows to multiply "
                f"embeddings of width {d_model}"
            )
        projections.append(x @ w)
    q, k, v = projections
    if q.shape[1] != k.shape[1]:
        raise InputError(
            f"W_Q gives width {q.shape[1]} but W_K gives {k.shape[1]}; they must match"
        )
    if num_heads < 1:
        raise InputError(f"--heads must be at least 1, got {num_heads}")
    if v.shape[1] % num_heads:
        raise InputError(f"W_V width {v.shape[1]} is not divisible by --heads {num_heads}")
    return reference_attention(
        split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads), causal
    )


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The fast path: torch's fused attention with GQA. q [H,T,d], k/v [H_kv,S,d] -> [H,T,d].

    For causal attention over a cache (T < S) the queries are the last T positions, which
    torch's `is_causal` (top-left aligned) does not express, so an explicit mask is used.
    Inputs get a batch dimension: on a CPU, torch only takes its flash-attention kernel for
    4-D inputs and falls back to the unfused math path (3-4x slower for a 130-token
    prefill, and it materialises the full score matrix) for 3-D ones. bf16/fp16 inputs are
    attended in fp32, as the math path does: the flash kernel's bf16 mode rounds the
    probabilities to bf16, and greedy bf16 output then agreed with fp32 on 2 of 5 test
    prompts instead of 4 (tests/model/test_model.py), for no measurable speed gain.
    """
    heads, tokens, _ = q.shape
    gqa = heads != k.shape[0]
    dtype = q.dtype
    if dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu":
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if causal and tokens > 1:
        if tokens == k.shape[2]:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = causal_mask(tokens, k.shape[2], q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    return out.squeeze(0).to(dtype)
