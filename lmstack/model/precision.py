"""The precision `--dtype auto` chooses for this CPU and model.

`--dtype auto` picks, for the bundled model on this machine:
- bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 matrix
  products run 3-9x faster than fp32, and lmstack's bf16 kernels apply;
- elsewhere (AVX2 and FMA only: there torch's bf16 matmul runs under 1 GFLOPS) the GGUF's
  own block-quantized weights (`gguf`: Q4_1 layers, Q8_0 LM head) through lmstack's integer
  kernel, for a model that comes as a GGUF; `q8_0` for float checkpoints;
- float32 where lmstack's kernels are unavailable (no compiler, LMSTACK_KERNELS=0).
"""

from __future__ import annotations

import os

from lmstack.cpu import isa_level, native_bf16


def choose_dtype(model: str | os.PathLike | None) -> tuple[str, str]:
    """(dtype, why) for `--dtype auto` on this machine and model."""
    from lmstack.kernels import qops
    from lmstack.model.weights import source_gguf

    level = isa_level()
    if native_bf16():
        return "bfloat16", f"{level}: the CPU multiplies bf16 natively"
    if not qops.linear_q_supported():
        from lmstack import kernels

        return "float32", f"{level}: no native bf16, quantized kernel {kernels.status()}"
    if source_gguf(model) is not None:
        return "gguf", f"{level}: no native bf16; the GGUF's own blocks, integer kernel"
    return "q8_0", f"{level}: no native bf16; float weights quantized to Q8_0, integer kernel"
