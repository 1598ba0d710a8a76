"""Tensor-level wrappers of the block-quantized kernels (gemm_q.cpp, layer_stack.cpp):
GGUF's Q4_1/Q4_0 and Q8_0 weights packed into the kernel's tiles, the quantized linear
layer, and all decoder layers of an engine step in one call. As in `ops`, every function has
a torch path beside it at its call site (lmstack.model.qlinear, lmstack.model.llama).
"""

from __future__ import annotations

import torch

from lmstack.kernels import load
from lmstack.kernels.ops import _check, _linear_rows

# Block-quantized linear layers (gemm_q.cpp): weights in GGUF's Q4_1/Q4_0 or Q8_0 blocks of
# 32 inputs, fp32 activations quantized to int8 per block inside the kernel.
Q_BLOCK, Q_COLS = 32, 8  # inputs per quantization block; output columns per packed group
Q4_TILE, Q8_TILE = 160, 272  # bytes per (group, block) tile


def linear_q_supported() -> bool:
    """Whether the compiled quantized linear kernel exists here (AVX2+FMA+F16C at build)."""
    return linear_q_path() is not None


def linear_q_path() -> str | None:
    """Which integer dot product the quantized kernel uses: "avx512_vnni" (vpdpbusd, where
    the CPU has AVX512-VNNI and LMSTACK_CPU_ISA allows it), "avx2" (vpmaddubsw), or None."""
    lib = load()
    code = 0 if lib is None else lib.lmstack_linear_q_supported()
    return {1: "avx2", 2: "avx512_vnni"}.get(code)


def _group_rows(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [ceil(n/8) * 8, ...], zero rows appended."""
    n = t.shape[0]
    pad = -n % Q_COLS
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t


def _fp16_bytes(scales: torch.Tensor, groups: int, blocks: int) -> torch.Tensor:
    """[n, blocks] scales -> [groups, blocks, 16] bytes: each tile's 8 columns as fp16."""
    s = _group_rows(scales.to(torch.float16)).view(groups, Q_COLS, blocks).transpose(1, 2)
    return s.contiguous().view(torch.uint8).view(groups, blocks, 2 * Q_COLS)


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_1 weights (w = d * q + m) -> the kernel's tiles [groups, blocks, 160] uint8.

    q [n, k] holds 0..15 (uint8), d and m [n, k/32] the blocks' scales and minimums."""
    n, k = q.shape
    if k % Q_BLOCK or d.shape != (n, k // Q_BLOCK) or m.shape != d.shape:
        raise ValueError(f"pack_q4 needs q [n, k] (k % 32 == 0) and d, m [n, k/32]; got {q.shape}")
    groups, blocks = -(-n // Q_COLS), k // Q_BLOCK
    # k = 32 b + 8 p + 4 h + i: vector p, nibble h (0 low, 1 high), byte i of the column's 4
    v = _group_rows(q.to(torch.uint8)).view(groups, Q_COLS, blocks, 4, 2, 4)
    quants = (v[..., 0, :] | (v[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)  # [g, b, p, c, i]
    quants = quants.reshape(groups, blocks, 128)
    tiles = [quants, _fp16_bytes(d, groups, blocks), _fp16_bytes(m, groups, blocks)]
    return torch.cat(tiles, dim=2).contiguous()


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q8_0 weights (w = d * q) -> the kernel's tiles [groups, blocks, 272] uint8.

    q [n, k] int8 in -127..127, d [n, k/32] the blocks' scales."""
    n, k = q.shape
    if k % Q_BLOCK or d.shape != (n, k // Q_BLOCK):
        raise ValueError(f"pack_q8 needs q [n, k] (k % 32 == 0) and d [n, k/32]; got {q.shape}")
    groups, blocks = -(-n // Q_COLS), k // Q_BLOCK
    v = _group_rows(q.to(torch.int8)).view(torch.uint8).view(groups, Q_COLS, blocks, 8, 4)
    quants = v.permute(0, 2, 3, 1, 4).reshape(groups, blocks, 256)  # [g, b, s, c, i]
    return torch.cat([quants, _fp16_bytes(d, groups, blocks)], dim=2).contiguous()


def dequantize_tiles(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The fp32 weight [n, k] that `pack_q4` (bits 4) or `pack_q8` (bits 8) tiles hold."""
    groups, blocks, _ = packed.shape
    if bits == 4:
        v = packed[..., :128].view(groups, blocks, 4, Q_COLS, 4)
        q = torch.stack([v & 0x0F, v >> 4], dim=3)  # [g, b, p, h, c, i]
        q = q.permute(0, 4, 1, 2, 3, 5).reshape(groups * Q_COLS, blocks, Q_BLOCK).float()
        d = _tile_scales(packed[..., 128:144])
        m = _tile_scales(packed[..., 144:160])
        w = q * d[..., None] + m[..., None]
    else:
        v = packed[..., :256].view(torch.int8).view(groups, blocks, 8, Q_COLS, 4)
        q = v.permute(0, 3, 1, 2, 4).reshape(groups * Q_COLS, blocks, Q_BLOCK).float()
        w = q * _tile_scales(packed[..., 256:272])[..., None]
    return w.reshape(groups * Q_COLS, blocks * Q_BLOCK)[:n]


def _tile_scales(raw: torch.Tensor) -> torch.Tensor:
    """[groups, blocks, 16] fp16 bytes -> [groups * 8, blocks] fp32 (one row per column)."""
    groups, blocks, _ = raw.shape
    s = raw.contiguous().view(torch.float16).float().view(groups, blocks, Q_COLS)
    return s.transpose(1, 2).reshape(groups * Q_COLS, blocks)


def linear_q(x: torch.Tensor, packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """x [..., k] fp32 @ W^T -> [..., n] fp32, W in `pack_q4`/`pack_q8` tiles."""
    k = packed.shape[1] * Q_BLOCK
    rows, out = _linear_rows(x, k, n, torch.float32, "linear_q")
    code = load().lmstack_linear_q(
        rows.data_ptr(),
        rows.shape[0],
        k,
        rows.stride(0),
        packed.data_ptr(),
        n,
        bits,
        out.data_ptr(),
        n,
        torch.get_num_threads(),
    )
    _check(code, f"linear_q (x {tuple(x.shape)}, W [{n}, {k}], Q{bits})")
    return out


def layer_stack(
    x: torch.Tensor,
    layer_args: tuple[torch.Tensor, torch.Tensor],
    shape: tuple[int, ...],
    eps: float,
    layout: tuple,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """All decoder layers of an engine step in one call (layer_stack.cpp), for models whose
    linear layers are all block-quantized. x [rows, hidden] fp32 embeddings (updated in
    place: the residual stream); returns the final norm's output [rows, hidden].

    layer_args: (linears, norms) int64 pointer tables (LlamaModel._stack_args); shape:
    (layers, hidden, heads, kv_heads, dim, inter); layout: the attention context's
    `paged_layout()`: (the whole fp32 KV cache [layers, 2, kv_heads, blocks, block_size,
    dim], slots [rows], decode rows, their block tables and lengths, prefill chunks [C, 4]).
    """
    pool, slots, decode_rows, tables, lengths, chunks = layout
    rows, hidden = x.shape
    _, _, _, num_blocks, block_size, _ = pool.shape
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    threads = torch.get_num_threads()
    dims = [rows, *shape, num_blocks, block_size, tables.stride(0), threads]
    dims = torch.tensor([*dims, len(decode_rows), len(chunks)], dtype=torch.int64)
    out = torch.empty_like(x)
    linears, norms = layer_args
    code = load().lmstack_layer_stack(
        x.data_ptr(),
        dims.data_ptr(),
        eps,
        linears.data_ptr(),
        norms.data_ptr(),
        pool.data_ptr(),
        slots.data_ptr(),
        tables.data_ptr(),
        lengths.data_ptr(),
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        decode_rows.data_ptr(),
        chunks.data_ptr(),
        out.data_ptr(),
    )
    _check(code, f"layer_stack ({rows} rows, {len(chunks)} chunks, pool {tuple(pool.shape)})")
    return out
