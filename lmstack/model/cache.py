"""Attention contexts for the model's forward pass outside the engine.

The model hands each layer's new q/k/v to a context's `attend`; the context decides where
keys and values live. `DenseKVCache` keeps one sequence contiguous (simple generation),
`NoCache` attends within the given tokens only (scoring, perplexity). The engine supplies a
paged context with the same two methods.
"""

from __future__ import annotations

import torch

from lmstack.model.attention import sdpa


class NoCache:
    """Causal attention over exactly the tokens passed in (one sequence)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # q [N, H, d], k/v [N, H_kv, d] -> [N, H, d]
        out = sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True)
        return out.transpose(0, 1)

    def finish_step(self, num_tokens: int) -> None:
        pass


class DenseKVCache:
    """A contiguous KV cache for one sequence, preallocated to `max_tokens`."""

    def __init__(self, config, max_tokens: int, dtype: torch.dtype = torch.float32):
        shape = (config.num_hidden_layers, config.num_key_value_heads, max_tokens, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.length = 0
        self.max_tokens = max_tokens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        n = q.shape[0]
        end = self.length + n
        if end > self.max_tokens:
            raise RuntimeError(f"KV cache full: {end} tokens > {self.max_tokens}")
        self.k[layer, :, self.length : end] = k.transpose(0, 1)
        self.v[layer, :, self.length : end] = v.transpose(0, 1)
        out = sdpa(q.transpose(0, 1), self.k[layer, :, :end], self.v[layer, :, :end], causal=True)
        return out.transpose(0, 1)

    def finish_step(self, num_tokens: int) -> None:
        self.length += num_tokens
