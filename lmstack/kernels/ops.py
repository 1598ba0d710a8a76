"""Tensor-level wrappers of the CPU kernels: shapes checked, outputs allocated.

Every function here (and in `qops`, the block-quantized ones) has a torch path beside it
at its call site; `usable(*tensors)` says whether the kernels may take these tensors
(loaded, CPU, fp32 or bf16, and no autograd: they work in place and record nothing, so
with grad enabled the torch path runs), and the callers fall back otherwise.
"""

from __future__ import annotations

import torch

from lmstack.kernels import MAX_DIM, MAX_GROUP, load

_DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype) -> bool:
    """Whether the kernels may run now, for tensors of this dtype."""
    return dtype in _DTYPES and not torch.is_grad_enabled() and load() is not None


def usable(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return available(dtype) and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors)


def _check(code: int, what: str) -> None:
    if code != 0:
        raise ValueError(f"CPU kernel {what} refused its arguments (code {code})")


def supports_paged(q: torch.Tensor, pool: torch.Tensor) -> bool:
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = pool.shape[1]
    return (
        usable(q, pool)
        and pool.is_contiguous()
        and dim <= MAX_DIM
        and heads % kv_heads == 0
        and heads // kv_heads <= MAX_GROUP
    )


def fast_paged(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether `paged_decode`/`paged_prefill` take the AVX512-BF16 paths for these shapes
    (attention_bf16.cpp, prefill_bf16.cpp: bf16, head size 64, 1-4 or 8 query heads per KV
    head, the counts csrc/groups.h compiles)."""
    group = q.shape[1] // pool.shape[1]
    return (
        q.dtype == torch.bfloat16
        and q.shape[2] == 64
        and group in (1, 2, 3, 4, 8)
        and supports_paged(q, pool)
        and linear_bf16_supported()  # compiled with AVX512-BF16, as that path is
    )


def tiled_prefill(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether `paged_prefill` has a tiled kernel for these shapes: the AVX512-BF16 one
    (`fast_paged`) or the fp32 one for AVX2+FMA (prefill_f32.cpp: head size <= 128, up to 8
    query heads per KV head)."""
    if q.dtype == torch.bfloat16:
        return fast_paged(q, pool)
    return (
        q.dtype == torch.float32
        and q.shape[2] <= 128
        and q.shape[1] // pool.shape[1] <= 8
        and supports_paged(q, pool)
        and load().lmstack_prefill_f32_supported() == 1
    )


def _scores_per_thread(q: torch.Tensor, pool: torch.Tensor, max_len: int) -> int:
    return q.shape[1] // pool.shape[1] * max_len  # query heads per KV head x keys


def decode_scratch(q: torch.Tensor, pool: torch.Tensor, max_len: int) -> torch.Tensor:
    """fp32 scratch for `paged_decode` calls that see at most `max_len` keys: a row of
    scores per thread, reusable by every layer of a step."""
    size = torch.get_num_threads() * _scores_per_thread(q, pool, max_len)
    return torch.empty(size, dtype=torch.float32)


def paged_decode(
    q: torch.Tensor,
    pool: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its blocks: q [B, H, d] -> [B, H, d].

    pool is one layer's [2, kv_heads, blocks, block_size, d]; tables [B, W] and lengths
    [B] are int64 (lengths count the visible tokens, the current one included). Rows of
    `tables` may share memory (an `expand`ed row: stride 0), as `paged_prefill`'s do.
    `work` is `decode_scratch(...)` (made here when missing or short); the kernel runs on at
    most as many threads as it has rows.
    """
    batch, heads, dim = q.shape
    _, kv_heads, num_blocks, block_size, _ = pool.shape
    q = q.contiguous()
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    max_len = int(lengths.max())
    row = _scores_per_thread(q, pool, max_len)
    threads = torch.get_num_threads()
    if work is None or work.numel() < threads * row:
        work = decode_scratch(q, pool, max_len)
    slots = min(threads, work.numel() // row)
    out = torch.empty_like(q)
    code = load().lmstack_paged_decode(
        q.data_ptr(),
        pool.data_ptr(),
        tables.data_ptr(),
        lengths.data_ptr(),
        out.data_ptr(),
        work.data_ptr(),
        q.element_size(),
        batch,
        heads,
        kv_heads,
        num_blocks,
        block_size,
        dim,
        tables.stride(0),  # elements from one row of the table to the next (0: shared)
        max_len,
        slots,
        dim**-0.5,
    )
    _check(code, f"paged_decode (q {tuple(q.shape)}, pool {tuple(pool.shape)})")
    return out


def paged_prefill(
    q: torch.Tensor,
    pool: torch.Tensor,
    table: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """Causal attention of a prefill chunk over its sequence's blocks: q [T, H, d] holds
    positions start .. start+T-1, whose keys and values are already in the pool; query i
    sees the first start+i+1 of them. Keys and values are read in place (no gathered copy).

    Where `tiled_prefill` holds this is a tiled kernel (prefill_bf16.cpp: 16 query rows per
    pass over the keys; prefill_f32.cpp: 8); elsewhere each query is one decode-style task,
    all sharing the one block table."""
    tokens, heads, dim = q.shape
    if tokens and tiled_prefill(q, pool):
        _, kv_heads, num_blocks, block_size, _ = pool.shape
        q, table = q.contiguous(), table.contiguous()
        out = torch.empty_like(q)
        lib = load()
        bf16 = q.dtype == torch.bfloat16
        kernel = lib.lmstack_paged_prefill_bf16 if bf16 else lib.lmstack_paged_prefill_f32
        ran = kernel(
            q.data_ptr(),
            pool.data_ptr(),
            table.data_ptr(),
            start,
            tokens,
            out.data_ptr(),
            heads,
            kv_heads,
            num_blocks,
            block_size,
            dim,
            torch.get_num_threads(),
            dim**-0.5,
        )
        if ran:
            return out
    lengths = torch.arange(start + 1, start + tokens + 1)
    return paged_decode(q, pool, table.view(1, -1).expand(tokens, -1), lengths)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * RMSNorm(x) for x [N, D]. With `delta`, first x += delta in place (the
    residual add fused with the next norm); x is then the updated residual stream."""
    rows, dim = x.shape
    if not x.is_contiguous() or (delta is not None and not delta.is_contiguous()):
        raise ValueError("rms_norm needs contiguous rows")
    out = torch.empty_like(x)
    code = load().lmstack_rms_norm(
        x.data_ptr(),
        None if delta is None else delta.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.element_size(),
        rows,
        dim,
        torch.get_num_threads(),
        eps,
    )
    _check(code, "rms_norm")
    return out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate x [N, heads, d] in place by its rows' positions (rotate-half RoPE). x may be a
    view into a wider row (q and k inside the fused qkv output); cos/sin are fp32 [P, d]."""
    rows, heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim:
        raise ValueError(f"rope_ needs [N, heads, d] with contiguous heads, got {x.stride()}")
    code = load().lmstack_rope(
        x.data_ptr(),
        x.element_size(),
        rows,
        heads,
        dim,
        x.stride(0),
        torch.get_num_threads(),
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
    )
    _check(code, "rope_")
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [N, 2I] (gate first) -> [N, I]."""
    rows, width = gate_up.shape
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(rows, width // 2)
    code = load().lmstack_silu_mul(
        gate_up.data_ptr(),
        out.data_ptr(),
        gate_up.element_size(),
        rows,
        width // 2,
        torch.get_num_threads(),
    )
    _check(code, "silu_mul")
    return out


BF16_BLOCK = 64  # output columns per block of the packed layout (gemm_bf16.cpp)


def linear_bf16_supported() -> bool:
    """Whether the compiled bf16 linear kernel exists here (AVX512-BF16 at build time)."""
    lib = load()
    return lib is not None and lib.lmstack_linear_bf16_supported() == 1


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """W [n, k] (k even) -> the kernel's layout [ceil(n/64), k/2, 64, 2] bf16, zero-padded."""
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"pack_bf16 needs an even number of input features, got {k}")
    blocks = -(-n // BF16_BLOCK)
    padded = torch.zeros(blocks * BF16_BLOCK, k, dtype=torch.bfloat16)
    padded[:n] = weight.detach()
    return padded.view(blocks, BF16_BLOCK, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack_bf16(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The plain weight [n, k] back from `pack_bf16`'s layout (the torch fallback's input)."""
    blocks, pairs = packed.shape[0], packed.shape[1]
    return packed.permute(0, 2, 1, 3).reshape(blocks * BF16_BLOCK, 2 * pairs)[:n]


def _linear_rows(x: torch.Tensor, k: int, n: int, dtype: torch.dtype, what: str):
    """(x as [rows, k] with unit column stride, the output [..., n]) for a linear kernel."""
    if x.dtype != dtype or x.shape[-1] != k:
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        raise ValueError(f"{what} wants {name} inputs of width {k}, got {x.dtype} {x.shape}")
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows, x.new_empty(*x.shape[:-1], n)


def linear_bf16(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x [..., k] @ W^T -> [..., n] in bf16, W packed by `pack_bf16`."""
    k = 2 * packed.shape[1]
    rows, out = _linear_rows(x, k, n, torch.bfloat16, "linear_bf16")
    if rows.shape[0] == 0:
        return out
    code = load().lmstack_linear_bf16(
        rows.data_ptr(),
        rows.shape[0],
        k,
        rows.stride(0),
        packed.data_ptr(),
        n,
        out.data_ptr(),
        n,
        torch.get_num_threads(),
    )
    _check(code, f"linear_bf16 (x {tuple(x.shape)}, W [{n}, {k}])")
    return out
