"""Linear layers in GGUF's block-quantized formats, run by lmstack's integer kernel.

Formats (32 inputs per block, fp16 scales, as llama.cpp stores them):
- `q4_1`: w = d * q + m with q in 0..15 (0.625 bytes a weight), the bundled GGUF's layers;
- `q4_0`: w = d * (q - 8), run as Q4_1 with m = -8 d (exact);
- `q8_0`: w = d * q with q in -127..127 (1.06 bytes a weight), the bundled GGUF's embedding
  and so its tied LM head.

`--dtype gguf` keeps every linear layer in the block format its GGUF file stores it in,
read from the file's raw blocks, so nothing is lost against the file: the bundled model
reads 92 MB of weights per decode step instead of 540 MB in fp32. `--dtype q4_1/q4_0/q8_0`
puts every layer in that format: tensors the file holds in a format of the same width are
taken as they are, the others (an HF directory's float weights, say) are quantized at load
with llama.cpp's reference rounding. Activations stay fp32 between layers; the kernel
quantizes them to int8 per block for its integer dot products (lmstack/kernels/csrc/
gemm_q.cpp). Embeddings, norms and the KV cache stay fp32.

Without the kernel (no AVX2 at build time, LMSTACK_KERNELS=0, autograd) a layer multiplies
by its dequantized weight in torch: the same weights, slower, without the activations'
int8 rounding.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import InputError, ModelLoadError
from lmstack.kernels import ops, qops

FORMATS = ("gguf", "q4_1", "q4_0", "q8_0")
BITS = {"q4_1": 4, "q4_0": 4, "q8_0": 8}
_BLOCK = qops.Q_BLOCK


# Outside the engine (a forward without a paged cache: perplexity, a plain generation
# loop), passes of at least this many rows take a layer's bf16 copy where it has one (see
# `add_bf16_prefill`): below it the integer kernel's fewer bytes win, above it the bf16
# kernel's 512-bit dot products do (lmstack bench kernels, AVX512-BF16 CPUs). In the engine
# the rule is `prompt_step` instead.
BF16_MIN_ROWS = 32

_step = threading.local()


@contextlib.contextmanager
def prompt_step():
    """Within this block (an engine step that holds prompt tokens), layers with a bf16 copy
    run every row on it; steps of decode tokens alone run on the blocks. Every prompt token
    then takes the bf16 path however its prompt is chunked or served from the prefix cache,
    so a prompt's keys and values, and the first token sampled from them, never depend on
    the cache. A decode token that shares its step with a prompt chunk takes it too: running
    those rows apart on the blocks costs a second pass per layer (20 users at 130/128 on a
    2-core Zen 4: 268 output tok/s against 284-326 in single runs), so under concurrent load
    later tokens may differ from a run alone in the last bits, as in any engine that batches
    across requests."""
    before = getattr(_step, "on", False)
    _step.on = True
    try:
        yield
    finally:
        _step.on = before


class QuantLinear(nn.Module):
    """y = x W^T with W in the kernel's Q4 (Q4_1/Q4_0) or Q8 (Q8_0) tiles, and optionally a
    bf16 copy of the same (dequantized) weight for steps of many rows."""

    def __init__(self, packed: torch.Tensor, out_features: int, bits: int, source: str):
        super().__init__()
        self.register_buffer("packed", packed)
        self.in_features = packed.shape[1] * _BLOCK
        self.out_features = out_features
        self.bits = bits
        self.source = source  # "gguf" (the file's own blocks) or "quantized" (at load)
        self.register_buffer("bf16", None)  # ops.pack_bf16 layout, see add_bf16_prefill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and ops.usable(x):
            if self.bf16 is not None and (
                getattr(_step, "on", False) or x.numel() >= BF16_MIN_ROWS * self.in_features
            ):
                y = ops.linear_bf16(x.to(torch.bfloat16), self.bf16, self.out_features)
                return y.float()
            if qops.linear_q_supported():
                return qops.linear_q(x, self.packed, self.out_features, self.bits)
        return F.linear(x, self.dequantized().to(x.dtype))

    def dequantized(self) -> torch.Tensor:
        return qops.dequantize_tiles(self.packed, self.out_features, self.bits)

    def extra_repr(self) -> str:
        fmt = "Q4" if self.bits == 4 else "Q8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {fmt}"


# ---------------------------------------------------------------------------------------
# Quantizers from float weights (llama.cpp's reference rounding), and GGUF's raw blocks.


def _blocks(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    if k % _BLOCK:
        raise InputError(f"block quantization needs a multiple of {_BLOCK} inputs, got {k}")
    return w.detach().float().view(n, k // _BLOCK, _BLOCK)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, k] -> (q int8 [n, k], d fp16 [n, k/32])."""
    b = _blocks(w)
    d = b.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(w.shape), d.half()


def quantize_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [n, k] -> (q uint8 0..15 [n, k], d fp16, m fp16 [n, k/32])."""
    b = _blocks(w)
    low, high = b.amin(-1), b.amax(-1)
    d = (high - low) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.floor((b - low[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)
    return q.view(w.shape), d.half(), low.half()


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [n, k] -> Q4_0 as Q4_1 (q uint8 0..15, d fp16, m = -8 d fp16)."""
    b = _blocks(w)
    # llama.cpp: d = (the signed value of largest magnitude) / -8, q = round(w / d) + 8
    idx = b.abs().argmax(-1, keepdim=True)
    d = (b.gather(-1, idx).squeeze(-1) / -8).half()
    df = d.float()
    inv = torch.where(df != 0, 1 / df, torch.zeros_like(df))
    q = torch.floor(b * inv[..., None] + 8.5).clamp(0, 15).to(torch.uint8)
    return q.view(w.shape), d, (-8 * df).half()


def pack_float(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """A float weight quantized to `fmt` and packed into the kernel's tiles."""
    if fmt == "q8_0":
        return qops.pack_q8(*quantize_q8_0(weight))
    return qops.pack_q4(*(quantize_q4_1(weight) if fmt == "q4_1" else quantize_q4_0(weight)))


_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def decode_gguf_blocks(kind: str, raw: np.ndarray, k: int) -> tuple:
    """A GGUF tensor's raw bytes [n, row bytes] -> (q, d[, m]) as the packers take them."""
    n = raw.shape[0]
    blocks = raw.reshape(n, k // _BLOCK, _GGUF_BLOCK_BYTES[kind])
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return q, d
    body = 4 if kind == "Q4_1" else 2
    qs = blocks[..., body:]  # 16 bytes: element j in the low nibble, j + 16 in the high one
    q = torch.from_numpy(np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k))
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
    else:
        m = (-8 * d.float()).half()
    return q, d, m


class GGUFBlocks:
    """The raw quantized tensors of a GGUF file, by name (memory-mapped by gguf)."""

    def __init__(self, path: Path):
        import gguf

        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # gguf raises ValueError, struct errors, OSError...
            raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.path = path
        self.tensors = {t.name: t for t in reader.tensors}
        heads = reader.fields.get("llama.attention.head_count")
        kv = reader.fields.get("llama.attention.head_count_kv")
        self.heads = int(heads.contents()) if heads else 0
        self.kv_heads = int(kv.contents()) if kv else self.heads

    def kind(self, name: str) -> str | None:
        t = self.tensors.get(name)
        return t.tensor_type.name if t is not None else None

    def rows(self, name: str) -> tuple:
        """(q, d, m) or (q, d) of a Q4_0/Q4_1/Q8_0 tensor, in the HF row order."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        k = int(t.shape[0])  # GGUF lists dimensions innermost first
        parts = decode_gguf_blocks(kind, np.asarray(t.data), k)
        layer_kind = name.split(".")[2] if name.startswith("blk.") else ""
        if layer_kind in ("attn_q", "attn_k"):  # undo llama.cpp's RoPE row interleave
            heads = self.heads if layer_kind == "attn_q" else self.kv_heads
            n = parts[0].shape[0]
            order = torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(n)
            parts = tuple(p[order] for p in parts)
        return parts


def _fused_from_file(blocks: GGUFBlocks, names: list[str], bits: int) -> torch.Tensor | None:
    """The tiles of rows concatenated from `names`, if all are stored `bits` wide."""
    kinds = [blocks.kind(n) for n in names]
    if any(GGUF_BITS.get(k or "") != bits for k in kinds):
        return None
    parts = [blocks.rows(n) for n in names]
    joined = [torch.cat(column) for column in zip(*parts)]
    return qops.pack_q4(*joined) if bits == 4 else qops.pack_q8(*joined)


def _layer_sources(net, config) -> list[tuple[nn.Module, str, list[str]]]:
    """(parent module, attribute, GGUF tensor names) of every linear layer."""
    out = []
    for i, layer in enumerate(net.model.layers):
        blk = f"blk.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        out += [
            (attn, "qkv_proj", [blk + f"attn_{x}.weight" for x in "qkv"]),
            (attn, "o_proj", [blk + "attn_output.weight"]),
            (mlp, "gate_up_proj", [blk + "ffn_gate.weight", blk + "ffn_up.weight"]),
            (mlp, "down_proj", [blk + "ffn_down.weight"]),
        ]
    head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    out.append((net, "lm_head", [head]))
    return out


def quantize_model(net, fmt: str, gguf_path: Path | None) -> dict[str, int]:
    """Replace every linear layer of a loaded float model by a QuantLinear, in place.

    Returns how many layers took the file's own blocks ("gguf") and how many were
    quantized from float weights ("quantized")."""
    if fmt not in FORMATS:
        raise InputError(f"quantized format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "gguf" and gguf_path is None:
        raise InputError("dtype 'gguf' runs a .gguf file's own weights; this model has none")
    blocks = GGUFBlocks(gguf_path) if gguf_path is not None else None
    counts = {"gguf": 0, "quantized": 0}
    for parent, attr, names in _layer_sources(net, net.config):
        linear = getattr(parent, attr)
        weight = linear.weight
        n = weight.shape[0]
        if fmt == "gguf":
            kinds = {GGUF_BITS.get(blocks.kind(x) or "") for x in names}
            bits = kinds.pop() if len(kinds) == 1 and None not in kinds else 8
        else:
            bits = BITS[fmt]
        packed = _fused_from_file(blocks, names, bits) if blocks is not None else None
        source = "gguf"
        if packed is None or packed.shape[1] * _BLOCK != weight.shape[1]:
            target = fmt if fmt != "gguf" else "q8_0"
            packed, source = pack_float(weight, target), "quantized"
        setattr(parent, attr, QuantLinear(packed, n, bits, source))
        counts[source] += 1
    return counts


def add_bf16_prefill(net) -> int:
    """On CPUs that multiply bf16 natively, give every decoder layer's QuantLinear a bf16 copy
    of its dequantized weight, for prefill. Decode steps read the 4-bit blocks (a quarter of
    bf16's bytes: memory-bound, the integer kernel wins); prompt chunks are compute-bound,
    and there the AVX512-BF16 kernel multiplies about twice as fast as the 256-bit integer
    one. Costs the bf16 bytes of the layers (212 MB for the bundled model; the LM head, which
    a step runs on one row per sequence, keeps only its blocks). Returns the layers given one."""
    from lmstack.cpu import native_bf16

    if not (native_bf16() and ops.linear_bf16_supported()):
        return 0
    count = 0
    for layer in net.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if isinstance(lin, QuantLinear) and lin.in_features % 2 == 0:
                lin.bf16 = ops.pack_bf16(lin.dequantized().to(torch.bfloat16))
                count += 1
    net.model.bf16_prefill = count > 0
    return count


def layer_stack_args(model) -> tuple[torch.Tensor, torch.Tensor, tuple] | None:
    """(linears, norms, shape) for qops.layer_stack over a LlamaModel's layers: int64 tables of
    every layer's packed weights with their format and of its norm weights, and (layers,
    hidden, heads, kv_heads, head_dim, intermediate). None where the one-call path does not
    apply: a layer not block-quantized, not fp32, or shapes the attention kernels cannot
    take (the tiled fp32 prefill: up to 8 query heads per KV head, head size 128)."""
    first = model.layers[0].self_attn
    group = first.num_heads // first.num_kv_heads
    if not (
        model.norm.weight.dtype == torch.float32
        and qops.linear_q_supported()
        and first.num_heads % first.num_kv_heads == 0
        and group <= 8
        and first.head_dim <= 128
        and ops.load().lmstack_prefill_f32_supported() == 1
    ):
        return None
    linears, norms = [], []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if not isinstance(lin, QuantLinear):
                return None
            linears += [lin.packed.data_ptr(), lin.bits]
        norms += [layer.input_layernorm.weight.data_ptr()]
        norms += [layer.post_attention_layernorm.weight.data_ptr()]
    norms.append(model.norm.weight.data_ptr())
    inter = model.layers[0].mlp.down_proj.in_features
    shape = (len(model.layers), model.norm.weight.numel(), first.num_heads, first.num_kv_heads)
    shape += (first.head_dim, inter)
    return torch.tensor(linears, dtype=torch.int64), torch.tensor(norms, dtype=torch.int64), shape
