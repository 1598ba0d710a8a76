"""The Llama-family decoder in plain PyTorch, top to bottom in the order data flows.

    tokens -> embed_tokens -> N x [RMSNorm -> attention (RoPE, GQA) -> +residual
                                   RMSNorm -> SwiGLU MLP -> +residual]
           -> RMSNorm -> lm_head (tied to embed_tokens) -> logits

Tokens are passed flattened: input_ids [N] with their positions [N], so one forward can
hold the prefill chunks and decode tokens of many sequences (the engine's batches). Where
keys and values are stored, and which tokens each query may see, is up to the attention
context passed in (lmstack.model.cache, or the engine's paged cache).
Parameter names follow Hugging Face's LlamaForCausalLM, except that q/k/v and gate/up are
fused at load time (fuse_hf_state_dict), so HF checkpoints load unchanged.

Inference on a CPU runs the element-wise layers through lmstack.kernels where they are
built: RMSNorm fused with the residual add before it, RoPE in place on the qkv output,
and SiLU(gate) * up, each one pass instead of 4-8 small torch ops (decode steps are
bound by the number of ops). The torch code below is the definition and the fallback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.errors import InputError, ModelLoadError
from lmstack.kernels import ops, qops
from lmstack.model.qlinear import prompt_step
from lmstack.model.weights import ModelConfig, load_config, load_state_dict, resolve_model

log = logging.getLogger("lmstack.engine")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InputError(
            f"dtype {name!r} is not supported; choose one of {', '.join(DTYPE_NAMES)}"
        ) from None


# Every --dtype lmstack takes: "auto" (lmstack.model.precision), torch float types, int8
# (weight-only, torch's kernel) and GGUF's block formats (lmstack.model.qlinear).
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", "int8", "gguf", "q4_1", "q4_0", "q8_0")


def resolve_dtype(dtype: str | torch.dtype | None, model=None) -> tuple[str, str]:
    """(dtype name, why) with "auto" (or None) decided for this CPU and model."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch."), "given"
    name = (dtype or "auto").lower()
    if name == "auto":
        from lmstack.model.precision import choose_dtype

        return choose_dtype(model)
    if name not in DTYPE_NAMES and name not in DTYPES:
        parse_dtype(name)  # raises, naming the choices
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name), "given"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.is_contiguous() and ops.usable(x, self.weight):
            return ops.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32 (bf16 squares lose precision), scale in the model dtype, as HF
        # does; torch's fused rms_norm keeps it to three kernels per call.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE, rotate-half form: each pair (x_i, x_{i+d/2}) turns by position * theta^(-2i/d)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [P, d]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """(cos, sin) for these positions, [N, 1, d]: computed once per forward pass and
        shared by all layers (per-layer lookups are pure overhead in small decode steps).
        Where the kernel rotates, (positions, cos table, sin table) instead (KernelRope)."""
        if ops.available(dtype) and self.cos.dtype == torch.float32:
            return KernelRope((positions.long().contiguous(), self.cos, self.sin))
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )


class KernelRope(tuple):
    """(positions [N], cos [P, d], sin [P, d]) for lmstack.kernels.ops.rope_."""


def apply_rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """x [N, heads, d] rotated by its positions' angles (in place on the kernel path)."""
    if isinstance(rope, KernelRope):
        return ops.rope_(x, *rope)
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, d = config.hidden_size, config.head_dim
        # Q, K and V as one matmul: on a CPU each call has a fixed cost that dominates
        # small decode batches (HF's q_proj/k_proj/v_proj are concatenated at load time).
        self.qkv_proj = nn.Linear(hidden, (self.num_heads + 2 * self.num_kv_heads) * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=False)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        n, d = x.shape[0], self.head_dim
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(n, heads + 2 * kv_heads, d)
        # Q and K heads rotate together in one call (same positions, same angles).
        qk = apply_rotary(qkv[:, : heads + kv_heads], rope)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, heads + kv_heads :]
        out = cache.attend(self.layer_idx, q, k, v)  # [N, H, d]
        return self.o_proj(out.reshape(n, self.num_heads * d))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.dim() == 2 and ops.usable(gate_up):
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def fuse_hf_state_dict(state: dict, num_layers: int) -> dict:
    """HF's separate q/k/v and gate/up weights -> this model's fused qkv_proj/gate_up_proj."""
    for i in range(num_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        if attn + "q_proj.weight" in state:
            state[attn + "qkv_proj.weight"] = torch.cat(
                [state.pop(attn + f"{n}_proj.weight") for n in "qkv"], dim=0
            )
        if mlp + "gate_proj.weight" in state:
            state[mlp + "gate_up_proj.weight"] = torch.cat(
                [state.pop(mlp + "gate_proj.weight"), state.pop(mlp + "up_proj.weight")], dim=0
            )
    return state


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.bf16_prefill = False  # set by qlinear.add_bf16_prefill
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta
        )

    def forward(self, input_ids, positions, cache) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [N, hidden]
        rope = self.rotary(positions, x.dtype)
        if len(self.layers) and x.dim() == 2 and ops.usable(x, self.norm.weight):
            # A step over a paged fp32 cache with block-quantized layers: one call.
            layout = getattr(cache, "paged_layout", None)
            if self.bf16_prefill and getattr(cache, "has_prompt_tokens", False):
                with prompt_step():  # per layer, on the layers' bf16 copies
                    return self._forward_fused(x, rope, cache)
            args = self._stack_args() if layout is not None else None
            layout = layout() if args is not None and isinstance(rope, KernelRope) else None
            if layout is not None:
                shape, eps = self._stack_shape, self.norm.eps
                return qops.layer_stack(x, args, shape, eps, layout, *rope)
            return self._forward_fused(x, rope, cache)
        for layer in self.layers:
            x = layer(x, rope, cache)
        return self.norm(x)

    def _stack_args(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Pointer tables for qops.layer_stack (lmstack.model.qlinear.layer_stack_args), or
        None where it does not apply. Built once."""
        cached = self.__dict__.get("_stack")
        if cached is None:
            from lmstack.model.qlinear import layer_stack_args

            built = layer_stack_args(self)
            cached = built[:2] if built else ()
            if built:
                self.__dict__["_stack_shape"] = built[2]
            self.__dict__["_stack"] = cached
        return cached or None

    def _forward_fused(self, x, rope, cache) -> torch.Tensor:
        """The layers of DecoderLayer.forward, with each residual add fused into the norm
        after it. x is this pass's own residual stream; the kernel adds into it in place."""
        layers = self.layers
        h = layers[0].input_layernorm(x)
        for i, layer in enumerate(layers):
            post = layer.post_attention_layernorm
            h = ops.rms_norm(x, post.weight, post.eps, delta=layer.self_attn(h, rope, cache))
            after = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            h = ops.rms_norm(x, after.weight, after.eps, delta=layer.mlp(h))
        return h


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.source: Path | None = None
        self.load_seconds = 0.0
        # The precision asked for or chosen ("auto" resolved), and why (logs, /metrics).
        self.dtype_name, self.dtype_reason = "float32", "given"

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Hidden states [N, hidden] for flattened tokens; the cache stores their K/V."""
        hidden = self.model(input_ids, positions, cache)
        cache.finish_step(input_ids.shape[0])
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] (sampling and log-probs want full precision)."""
        return self.lm_head(hidden).float()

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            # oneDNN-packed weights (lmstack.model.packed) are opaque: no shared storage.
            key = id(t) if t.is_mkldnn else t.data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        dtype: str | torch.dtype = "float32",
        pack: bool = True,
    ) -> LlamaForCausalLM:
        """Load the bundled model ("bundled"/None), a .gguf file or an HF directory.

        dtype "auto" is chosen for this CPU (lmstack.model.precision). "int8" loads bf16
        weights and quantizes the linear layers (lmstack.model.quant); "gguf", "q4_1",
        "q4_0" and "q8_0" put them in GGUF's block formats, from the file's own blocks where
        it has them (lmstack.model.qlinear). fp32 and bf16 linear layers are pre-packed for
        oneDNN unless `pack` is False (lmstack.model.packed; a no-op where the CPU or build
        cannot).
        """
        from lmstack.model.qlinear import FORMATS

        start = time.perf_counter()
        dtype_name, dtype_reason = resolve_dtype(dtype, model)
        if dtype_reason != "given":
            log.info("dtype auto -> %s (%s)", dtype_name, dtype_reason)
        quantize = dtype_name == "int8"
        blocks = dtype_name in FORMATS
        if quantize:
            torch_dtype = torch.bfloat16
        elif blocks:
            torch_dtype = torch.float32
        else:
            torch_dtype = parse_dtype(dtype_name)
        model_dir = resolve_model(model)
        config = load_config(model_dir)
        state = fuse_hf_state_dict(load_state_dict(model_dir), config.num_hidden_layers)
        with torch.device("meta"):
            net = cls(config)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        expected = {
            k
            for k in net.state_dict()
            if not k.startswith("lm_head") or not config.tie_word_embeddings
        }
        missing = expected - state.keys()
        if missing:
            raise ModelLoadError(
                f"{model_dir}: weights missing {len(missing)} tensors, e.g. {sorted(missing)[0]}"
            )
        state = {k: v.to(torch_dtype) for k, v in state.items() if k in expected}
        try:
            net.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{model_dir}: weights do not fit the config ({exc})") from exc
        if config.tie_word_embeddings:
            net.lm_head.weight = net.model.embed_tokens.weight
        # Buffers were created on the meta device; rebuild them for real.
        net.model.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta
        )
        if quantize:
            from lmstack.model.quant import quantize_int8

            quantize_int8(net)
        elif blocks:
            from lmstack.model.qlinear import add_bf16_prefill, quantize_model
            from lmstack.model.weights import source_gguf

            quantize_model(net, dtype_name, source_gguf(model))
            if add_bf16_prefill(net):
                log.info("prompt steps run on a bf16 copy of the layers")
                dtype_reason += "; prompt steps on a bf16 copy of the layers"
        elif pack:
            from lmstack.model.packed import pack_linears

            pack_linears(net)
        net.eval()
        net.dtype_name, net.dtype_reason = dtype_name, dtype_reason
        net.source = model_dir
        net.load_seconds = time.perf_counter() - start
        return net


_SHARED: dict[tuple[str, str], tuple[LlamaForCausalLM, object]] = {}


def shared_model(model: str | Path | None = None, dtype: str = "float32"):
    """(model, tokenizer), loaded once per process and shared by every caller.

    CLI commands, apps and the test session all read the same weights; inference never
    mutates them, so one copy serves all.
    """
    from lmstack.model.tokenizer import Tokenizer

    name, _ = resolve_dtype(dtype, model)  # "auto" shares the copy of what it chooses
    key = (str(model or "bundled"), name)
    if key not in _SHARED:
        net = LlamaForCausalLM.from_pretrained(model, dtype)
        _SHARED[key] = (net, Tokenizer(net.source))
    return _SHARED[key]
