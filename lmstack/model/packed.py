"""Linear layers with their weights laid out once, at load, in oneDNN's blocked format.

A plain `F.linear` on a CPU hands oneDNN (or MKL) a row-major weight, and the library
re-arranges ("packs") it into the tiled layout its kernels read before every single call.
For a decode step that re-arrangement costs about as much as the multiplication itself: the
weights are read twice and written once for a handful of input rows. `PackedLinear` packs
once and calls oneDNN's matmul on the packed copy. `lmstack bench kernels` (bf16, the
bundled model's layer shapes, on the 2-core dev machine, two runs) measured 1.6-3.3x the
plain call for one row, 1.5-1.9x for a 20-row decode batch and 1.1-1.2x for a 256-token
prefill chunk; results are bit-identical to `F.linear` in bf16 (tests/model/test_packed.py).

On CPUs with AVX512-BF16, bf16 layers go one step further: `KernelLinear` packs the weight
for lmstack's own compiled kernel (lmstack/kernels/csrc/gemm_bf16.cpp), which overlaps
streaming the next block of weights with arithmetic on the current one. A decode step
streams every weight of the model from memory, and there the kernel is 1.3-1.5x oneDNN's
packed matmul for 20 rows, and level with it for prefill chunks (`lmstack bench kernels`).
With the kernels turned off (LMSTACK_KERNELS=0 at load: oneDNN packing instead; later
`kernels.disabled()` or autograd: `F.linear` on the unpacked weight) results stay correct.

Packing needs a CPU tensor and a PyTorch build with oneDNN (every x86 wheel has it); bf16
also needs oneDNN's bf16 support (AVX512-BF16 or AMX). Where they are missing,
`pack_linears` leaves the model as it is. The packed weight replaces the plain one, so
memory does not grow, except for a tied LM head, which gets its own packed copy of the
embedding matrix (the embedding lookup keeps the plain one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.kernels import ops

_PACKABLE = (torch.float32, torch.bfloat16)


def packing_supported(dtype: torch.dtype) -> bool:
    if dtype not in _PACKABLE or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        # native_bf16 honours LMSTACK_CPU_ISA=avx2, under which oneDNN is limited to AVX2
        from lmstack.cpu import native_bf16

        return native_bf16() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
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


class KernelLinear(nn.Module):
    """y = x W^T in bf16 through lmstack's compiled kernel, W packed once (ops.pack_bf16)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("packed", ops.pack_bf16(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.usable(x) and x.dtype == torch.bfloat16 and ops.linear_bf16_supported():
            return ops.linear_bf16(x, self.packed, self.out_features)
        return F.linear(x, ops.unpack_bf16(self.packed, self.out_features).to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel"


def kernel_supported(weight: torch.Tensor) -> bool:
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.shape[1] % 2 == 0
        and ops.linear_bf16_supported()
    )


def pack_linears(model: nn.Module) -> int:
    """Replace every bias-free CPU nn.Linear in a packable dtype by a KernelLinear (bf16 where
    the compiled kernel runs) or a PackedLinear (oneDNN), in place.

    Returns how many layers were packed (0 when the build or the CPU cannot).
    """
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child.bias is not None:
                continue
            weight = child.weight
            if kernel_supported(weight):
                setattr(module, name, KernelLinear(weight))
            elif weight.device.type == "cpu" and packing_supported(weight.dtype):
                setattr(module, name, PackedLinear(weight))
            else:
                continue
            count += 1
    return count
