"""`lmstack bench kernels`: the engine's CPU kernels against the plain torch calls they replace.

Two rows per shape, measured interleaved in one process (so machine noise hits both):
- linear: every projection of one decoder layer plus the LM head, `F.linear` on the plain
  weight vs the oneDNN pre-packed weight (lmstack.model.packed), at decode (1 and 20 rows)
  and prefill (256 rows) sizes;
- prefill attention: torch SDPA on 3-D GQA inputs (its unfused math path on a CPU) vs
  `lmstack.model.attention.sdpa` (4-D inputs, the fused flash kernel);
- decode attention over the paged KV cache, one layer, 20 sequences of 150-280 tokens in
  scattered blocks: the engine's torch path (gather the blocks, batched matmuls) vs the
  compiled kernel that reads them in place (lmstack.kernels; skipped where it
  cannot be built);
- prefill attention over the paged KV cache, one layer, a 512-token prompt and a 160-token
  chunk after 3,000 tokens: the engine's torch path (gather the blocks, torch's flash SDPA)
  vs the kernel that reads them in place (bf16 on AVX512-BF16: the tiled kernel; fp32:
  one decode-style task per query);
- a decode step's linear layers, every layer of the model plus the LM head for 1 and 20
  rows, so the weights stream from memory as in the engine: oneDNN's packed matmul vs
  lmstack's compiled kernel (bf16 on AVX512-BF16 CPUs; for the block formats, the integer
  kernel on GGUF's Q4_1 layers and Q8_0 head against oneDNN's packed fp32).

For a block format (`gguf`, `q4_1`, `q4_0`, `q8_0`: what `--dtype auto` picks on CPUs
without native bf16) the linear rows compare oneDNN's packed fp32 with the quantized
kernel, and attention runs in fp32, as the engine runs them for that precision.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lmstack import kernels
from lmstack.kernels import ops, qops
from lmstack.model.attention import sdpa
from lmstack.model.packed import KernelLinear, PackedLinear, packing_supported
from lmstack.model.qlinear import BITS, QuantLinear, pack_float


def _time_ms(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def _pair(plain, fast, repeats: int, rounds: int = 5) -> tuple[float, float]:
    """Median ms per call of each, timed in alternating rounds (drift hits both alike)."""
    plain(), fast()  # warm-up
    a = [(_time_ms(plain, repeats), _time_ms(fast, repeats)) for _ in range(rounds)]
    return sorted(x for x, _ in a)[rounds // 2], sorted(y for _, y in a)[rounds // 2]


def _quantized(weight: torch.Tensor, fmt: str, head: bool) -> QuantLinear:
    """The layer as the engine holds it in `fmt` (gguf: Q4_1 layers, Q8_0 LM head)."""
    if fmt == "gguf":
        fmt = "q8_0" if head else "q4_1"
    return QuantLinear(pack_float(weight, fmt), weight.shape[0], BITS[fmt], "quantized")


def bench_kernels(config, dtype: torch.dtype | str, rows=(1, 20, 256)) -> list[dict]:
    """Rows of {kernel, shape, baseline_ms, lmstack_ms, speedup} for a model config.

    `dtype` is a torch float type or a block format name (lmstack.model.qlinear.FORMATS)."""
    fmt = dtype if isinstance(dtype, str) else None
    if fmt is not None:
        if not qops.linear_q_supported():
            raise RuntimeError(f"the quantized kernel is not available here ({kernels.status()})")
        dtype = torch.float32
    if not packing_supported(dtype):
        raise RuntimeError(f"oneDNN weight packing is not available for {dtype} on this CPU")
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = [
        ((heads + 2 * kv_heads) * dim, hidden),
        (hidden, heads * dim),
        (2 * inter, hidden),
        (hidden, inter),
        (config.vocab_size, hidden),
    ]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=gen).to(dtype) * 0.02 for o, i in shapes]
    packed = [PackedLinear(w) for w in weights]
    if fmt is None:  # plain F.linear vs oneDNN's packed weights
        baseline = [lambda x, w=w: F.linear(x, w) for w in weights]
        ours_layers = packed
    else:  # oneDNN's packed fp32 vs the quantized kernel
        baseline = packed
        ours_layers = [_quantized(w, fmt, i == len(weights) - 1) for i, w in enumerate(weights)]
    widths = [w.shape[1] for w in weights]
    results = []
    for m in rows:
        x = {i: torch.randn(m, i, generator=gen).to(dtype) for _, i in shapes}

        def plain(x=x):
            for layer, width in zip(baseline, widths):
                layer(x[width])

        def fast(x=x):
            for layer, width in zip(ours_layers, widths):
                layer(x[width])

        with torch.inference_mode():
            base, ours = _pair(plain, fast, repeats=max(2, 40 // m))
        name = "linear (layer + LM head)" + (
            f", fp32 packed vs {fmt} ({qops.linear_q_path()})" if fmt else ""
        )
        results.append(_row(name, f"{m} rows", base, ours))
    for tokens in (130, 512):
        q = torch.randn(heads, tokens, dim, generator=gen).to(dtype)
        k = torch.randn(kv_heads, tokens, dim, generator=gen).to(dtype)
        v = torch.randn(kv_heads, tokens, dim, generator=gen).to(dtype)

        def math_path(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def flash_path(q=q, k=k, v=v):
            sdpa(q, k, v, causal=True)

        base, ours = _pair(math_path, flash_path, repeats=4)
        results.append(_row("prefill attention (causal, GQA)", f"{tokens} tokens", base, ours))
    if kernels.load() is not None:
        results.append(_paged_decode_row(heads, kv_heads, dim, dtype, gen))
    for tokens, start in ((512, 0), (160, 3000)):
        q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
        row = _paged_prefill_row(q, kv_heads, start, gen)
        if row:
            results.append(row)
    if fmt is not None:
        for m in (1, 20):
            results.append(_streamed_linear_row(shapes, config.num_hidden_layers, gen, m, fmt))
    elif dtype == torch.bfloat16 and ops.linear_bf16_supported():
        results.append(_streamed_linear_row(shapes, config.num_hidden_layers, gen))
    return results


def _streamed_linear_row(shapes, layers: int, gen, rows: int = 20, fmt=None) -> dict:
    """All layers' weights (and the LM head) once each, as a decode step reads them: far more
    than the caches hold, so this measures streaming weights, not arithmetic alone."""
    dtype = torch.float32 if fmt else torch.bfloat16
    per_layer, head = shapes[:-1], shapes[-1]
    weights = []
    for _ in range(layers):
        weights += [torch.randn(o, i, generator=gen).to(dtype) * 0.02 for o, i in per_layer]
    weights.append(torch.randn(*head, generator=gen).to(dtype) * 0.02)
    onednn = [PackedLinear(w) for w in weights]
    if fmt:
        ours = [_quantized(w, fmt, i == len(weights) - 1) for i, w in enumerate(weights)]
    else:
        ours = [KernelLinear(w) for w in weights]
    del weights
    x = {i: torch.randn(rows, i, generator=gen).to(dtype) for _, i in shapes}

    def run(layers_):
        for layer in layers_:
            layer(x[layer.in_features])

    with torch.inference_mode():
        base, fast = _pair(lambda: run(onednn), lambda: run(ours), repeats=2)
    shape = f"{rows} rows x {layers} layers + LM head"
    versus = f"fp32 oneDNN packed vs {fmt}" if fmt else "oneDNN packed vs compiled"
    return _row(f"linear, decode step ({versus})", shape, base, fast)


def _paged_decode_row(heads, kv_heads, dim, dtype, gen, batch=20, block_size=16) -> dict:
    from lmstack.engine.model_runner import PagedAttention

    lengths = torch.randint(150, 281, (batch,), generator=gen)
    width = int(lengths.max() + block_size - 1) // block_size
    num_blocks = 1024  # the pool is larger than the batch's blocks, which lie scattered in it
    pool = torch.randn(2, kv_heads, num_blocks, block_size, dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * width].view(batch, width)
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    ctx = PagedAttention(None, torch.empty(0), torch.empty(0), tables, lengths, [])
    base, ours = _pair(
        lambda: ctx._decode_torch(q, pool),
        lambda: ops.paged_decode(q, pool, tables, lengths),
        repeats=20,
    )
    return _row("decode attention (paged, one layer)", f"{batch} seqs x 150-280 tokens", base, ours)


def _paged_prefill_row(q, kv_heads, start, gen, block_size=16) -> dict | None:
    tokens, _, dim = q.shape
    blocks = (start + tokens + block_size - 1) // block_size
    pool = torch.randn(2, kv_heads, 2 * blocks, block_size, dim, generator=gen).to(q.dtype)
    table = torch.randperm(2 * blocks, generator=gen)[:blocks]
    with torch.inference_mode():
        if not (ops.tiled_prefill(q, pool)):
            return None

        def gathered():
            kv = pool.index_select(2, table).flatten(2, 3)[:, :, : start + tokens]
            return sdpa(q.transpose(0, 1), kv[0], kv[1], causal=True)

        base, ours = _pair(gathered, lambda: ops.paged_prefill(q, pool, table, start), repeats=3)
    shape = f"{tokens} tokens" + (f" after {start:,}" if start else "")
    return _row("prefill attention (paged, one layer)", shape, base, ours)


def _row(kernel: str, shape: str, base: float, ours: float) -> dict:
    return {
        "kernel": kernel,
        "shape": shape,
        "baseline_ms": round(base, 3),
        "lmstack_ms": round(ours, 3),
        "speedup": round(base / ours, 2),
    }
