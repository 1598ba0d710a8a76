"""The precision `--dtype auto` chooses for this CPU and model.

`--dtype auto` picks, for the model on this machine:
- a model that comes as a GGUF (the bundled one does), wherever lmstack's integer kernel
  runs (AVX2 + FMA + F16C): `gguf`, the file's own block-quantized weights (Q4_1 layers,
  Q8_0 LM head). Decoding reads every weight once per step, so it is bound by memory, and
  the 4-bit blocks are a third of bf16's bytes: single-stream decode runs 2-3x faster than
  in bf16, even where the CPU multiplies bf16 natively. There (AVX512-BF16 or AMX) the
  layers also keep a bf16 copy for prompt chunks, which are bound by compute and where the
  bf16 kernel is the faster one (lmstack.model.qlinear.add_bf16_prefill). Perplexity stays
  within 0.4% of the fp32 dequantized model;
- a float checkpoint: bfloat16 where the CPU multiplies bf16 natively (3-9x faster than
  fp32 there), `q8_0` elsewhere (AVX2 and FMA only: there torch's bf16 matmul runs under
  1 GFLOPS);
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
    quantized = qops.linear_q_supported()
    if quantized and source_gguf(model) is not None:
        path = qops.linear_q_path()
        return (
            "gguf",
            f"{level}: the GGUF's own blocks, integer kernel ({path}), memory-bound decode",
        )
    if native_bf16():
        return "bfloat16", f"{level}: the CPU multiplies bf16 natively"
    if not quantized:
        from lmstack import kernels

        return "float32", f"{level}: no native bf16, quantized kernel {kernels.status()}"
    return "q8_0", f"{level}: no native bf16; float weights quantized to Q8_0, integer kernel"
