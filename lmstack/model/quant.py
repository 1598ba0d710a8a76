"""int8 weight-only quantization of the linear layers (per-output-channel, symmetric).

Each weight row w is stored as round(w / s) in int8 with s = max|w| / 127, so weights take a
quarter of fp32's memory. Activations stay bf16; the product runs in torch's int8
weight-only kernel, which reads int8 weights and applies the row scales on the fly.
Embeddings and norms stay in bf16; the LM head gets its own int8 copy of the (tied)
embedding matrix, because at batch 1 it is the largest single read of a decode step.

torch's int8 kernel is 2x faster than bf16 at batch 1 (half the bytes to read) but slower
than bf16's oneDNN path from batch ~8 up: int8 is the memory-saving, single-stream choice,
bf16 the throughput choice under load (see `lmstack bench precision` and `bench offline`).
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype))
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).to(self.compute_dtype), self.qweight, self.scale
        )
        return out.view(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (the LM head included) by an Int8Linear, in place."""
    model.to(torch.bfloat16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight))
    return model
