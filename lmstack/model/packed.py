"""Linear layers with their weights laid out once, at load, in oneDNN's blocked format.

A plain `F.linear` on a CPU hands oneDNN (or MKL) a row-major weight, and the library
re-arranges ("packs") it into the tiled layout its kernels read before every single call.
For a decode step that re-arrangement costs about as much as the multiplication itself: the
weights are read twice and written once for a handful of input rows. `PackedLinear` packs
once and calls oneDNN's matmul on the packed copy. `lmstack bench kernels` (bf16, the
bundled model's layer shapes, on the 2-core dev machine, two runs) measured 1.6-3.3x the
plain call for one row, 1.5-1.9x for a 20-row decode batch and 1.1-1.2x for a 256-token
prefill chunk; results are bit-identical to `F.linear` in bf16 (tests/test_packed.py).

Packing needs a CPU tensor and a PyTorch build with oneDNN (every x86 wheel has it); bf16
also needs oneDNN's bf16 support (AVX512-BF16 or AMX). Where they are missing,
`pack_linears` leaves the model as it is. The packed weight replaces the plain one, so
memory does not grow, except for a tied LM head, which gets its own packed copy of the
embedding matrix (the embedding lookup keeps the plain one).
"""

from __future__ import annotations

import torch
from torch import nn

_PACKABLE = (torch.float32, torch.bfloat16)


def packing_supported(dtype: torch.dtype) -> bool:
    if dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


class PackedLinear(nn.Module):
    """y = x W^T with W pre-packed for oneDNN (no bias: the Llama family has none)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        w = weight.detach().contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every bias-free CPU nn.Linear in a packable dtype by a PackedLinear, in place.

    Returns how many layers were packed (0 when the build or the CPU cannot).
    """
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child.bias is not None:
                continue
            weight = child.weight
            if weight.device.type != "cpu" or not packing_supported(weight.dtype):
                continue
            setattr(module, name, PackedLinear(weight))
            count += 1
    return count
