"""Capacity planners: will a document fit a context window, and how many sequences fit a GPU.

Pure arithmetic on rules of thumb and architecture numbers, so the answers can be checked by
hand. Nothing here imports torch; the bundled tokenizer loads only when a file is counted.
GB means 1e9 bytes throughout.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from lmstack.errors import InputError

TOKENS_PER_WORD = 1.33  # English rule of thumb for BPE tokenizers
WORDS_PER_PAGE = 500
ZH_TOKENS_PER_CHAR = (1.5, 2.0)  # budget with the high end so the plan errs on the safe side
PARAM_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
# Weight-only quantization leaves the KV cache in 16-bit; only fp32 keeps it in 4 bytes.
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 2, "int4": 2}
VLLM_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
VLLM_QUANTIZATION = {"int8": "gptq", "int4": "awq"}
LLAMA2_7B = {"layers": 32, "kv_heads": 32, "head_dim": 128}  # defaults for --params alone
RECOMMENDED_HEADROOM = 0.10  # what vLLM's default --gpu-memory-utilization 0.90 leaves free


def _positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise InputError(f"{name} must be greater than 0, got {value}")


# ---------------------------------------------------------------------------------------
# Context window


def plan_tokens(
    *,
    words: int | None = None,
    pages: int | None = None,
    file: str | Path | None = None,
    window: int = 8192,
    system: int = 200,
    reserve: int = 500,
    language: str = "en",
) -> dict:
    """How much of a document fits the context window, and which strategy to use."""
    sources = (("--words", words), ("--pages", pages), ("--file", file))
    given = [name for name, value in sources if value is not None]
    if len(given) != 1:
        raise InputError(
            "give exactly one of --words, --pages or --file"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if language not in ("en", "zh"):
        raise InputError(f"--language must be en or zh, got {language!r}")
    for name, value in (*sources[:2], ("--window", window)):
        _positive(name, value)
    for name, value in (("--system", system), ("--reserve", reserve)):
        if value < 0:
            raise InputError(f"{name} must be 0 or more, got {value}")
    if system + reserve >= window:
        raise InputError(
            f"--system {system} + --reserve {reserve} = {system + reserve} tokens leaves no room "
            f"in a --window of {window} tokens"
        )
    unit = "characters" if language == "zh" else "words"
    rate = ZH_TOKENS_PER_CHAR[1] if language == "zh" else TOKENS_PER_WORD
    notes: list[str] = []
    tokenizer_tokens = token_range = None
    if file is not None:
        text = _read_text(Path(file))
        # Chinese has no spaces between words: count characters, not whitespace runs.
        count = len(re.sub(r"\s", "", text)) if language == "zh" else len(text.split())
        tokenizer_tokens = _count_with_bundled_tokenizer(text)
        method = "tokenizer"
        notes.append("counted with the bundled SmolLM2 tokenizer; other models' tokenizers differ")
    else:
        count = words if words is not None else pages * WORDS_PER_PAGE
        method = "rule-of-thumb"
        if pages is not None:
            notes.append(f"{WORDS_PER_PAGE} {unit} per page assumed")
    estimate = round(count * rate)
    if language == "zh":
        low, high = (round(count * r) for r in ZH_TOKENS_PER_CHAR)
        notes.append(f"Chinese: {low:,}-{high:,} tokens at 1.5-2 per character; budgeted at 2.0")
        token_range = [low, high]
    else:
        notes.append(f"rule of thumb: {TOKENS_PER_WORD} tokens per English word")
    document = tokenizer_tokens if tokenizer_tokens is not None else estimate
    if document <= 0:
        raise InputError(f"the document has {document} tokens; nothing to plan")
    available = window - system - reserve
    coverage = min(1.0, available / document)
    chunks = math.ceil(document / available)
    strategy, reason, whole_doc = _strategy(coverage, chunks)
    return {
        "method": method,
        "language": language,
        "unit": unit,
        "count": count,
        "document_tokens": document,
        "rule_of_thumb_tokens": estimate,
        "tokenizer_tokens": tokenizer_tokens,
        "window": window,
        "system": system,
        "reserve": reserve,
        "available_tokens": available,
        "coverage": round(coverage, 4),
        "chunks": chunks,
        "token_range": token_range,
        "strategy": strategy,
        "strategy_reason": reason,
        "whole_document_strategy": whole_doc,
        "notes": notes,
    }


def _strategy(coverage: float, chunks: int) -> tuple[str, str, str | None]:
    if coverage >= 1:
        return "stuff", "the whole document fits: put it in the prompt as is", None
    reason = f"only {coverage:.1%} fits: retrieve the chunks relevant to each question, stuff those"
    # Few chunks: a sequential refine keeps the thread; many: independent map calls parallelise.
    if coverage < 0.5:
        whole = f"map-reduce: summarise each of {chunks} chunks in parallel, then combine them"
    else:
        whole = f"refine: summarise chunk 1 of {chunks}, then revise it with each next chunk"
    return "rag", reason, whole


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"--file {path}: no such file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"--file {path}: not UTF-8 text (invalid byte at offset {exc.start}); "
            "convert it to UTF-8 first"
        ) from exc


def _count_with_bundled_tokenizer(text: str) -> int:
    from lmstack.model.tokenizer import Tokenizer
    from lmstack.model.weights import resolve_model

    return len(Tokenizer(resolve_model("bundled")).encode(text))


# ---------------------------------------------------------------------------------------
# GPU memory


def parse_count(value: str | float | int) -> int:
    """'7B', '134.5M', '7e9' or 7000000000 -> a parameter count."""
    text = str(value).strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale != 1 else text)
    except ValueError:
        raise InputError(f"--params {value!r} is not a number like 7e9 or 7B") from None
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"--params must be greater than 0, got {value!r}")
    return round(number * scale)


def count_params(config) -> int:
    """Parameters of a Llama-family ModelConfig: embeddings, attention, MLP and norms."""
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * h * config.intermediate_size  # gate, up and down projections
    layer = attention + mlp + 2 * h  # two RMSNorm weights
    embeddings = config.vocab_size * h
    head = 0 if config.tie_word_embeddings else embeddings  # a tied head shares the table
    return embeddings + config.num_hidden_layers * layer + h + head


def plan_memory(
    *,
    params: str | float | int | None = None,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    hidden: int | None = None,
    model: str | None = None,
    dtype: str = "fp16",
    gpu_gb: float = 24.0,
    context: int = 4096,
    tensor_parallel: int = 1,
    overhead: float = 0.0,
) -> dict:
    """Weights, KV cache and how many `context`-token sequences fit each device."""
    if dtype not in PARAM_BYTES:
        raise InputError(f"--dtype {dtype!r} is not one of {', '.join(PARAM_BYTES)}")
    sizes = {"--gpu-gb": gpu_gb, "--context": context, "--layers": layers}
    sizes |= {"--kv-heads": kv_heads, "--head-dim": head_dim, "--hidden": hidden}
    for name, value in sizes.items():
        _positive(name, value)
    if tensor_parallel < 1:
        raise InputError(f"--tensor-parallel must be 1 or more, got {tensor_parallel}")
    if not 0 <= overhead < 1:
        raise InputError(f"--overhead is a fraction of device memory in [0, 1), got {overhead}")
    notes: list[str] = []
    model_path = "MODEL"
    if model is not None:
        if any(v is not None for v in (params, layers, kv_heads, head_dim, hidden)):
            raise InputError(
                "give either --model or --params/--layers/--kv-heads/--head-dim/--hidden"
            )
        config, model_path = _load_model_config(model)
        if context > config.max_position_embeddings:
            raise InputError(
                f"--context {context} is longer than the model's "
                f"max_position_embeddings of {config.max_position_embeddings}"
            )
        n_params = count_params(config)
        layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim, hidden = config.head_dim, config.hidden_size
        notes.append(f"parameters counted from {model_path}/config.json")
    else:
        if params is not None:
            n_params = parse_count(params)
        elif layers is not None and hidden is not None:
            n_params = 12 * layers * hidden**2
            notes.append("params estimated as 12 x layers x hidden^2 (embeddings not included)")
        else:
            raise InputError("give --params (e.g. 7B), --layers with --hidden, or --model DIR")
        assumed = [k for k, v in zip(LLAMA2_7B, (layers, kv_heads, head_dim)) if v is None]
        if assumed:
            notes.append(
                "assumed Llama-2-7B shape for "
                + ", ".join(f"{k.replace('_', '-')} {LLAMA2_7B[k]}" for k in assumed)
            )
        layers = layers or LLAMA2_7B["layers"]
        kv_heads = kv_heads or LLAMA2_7B["kv_heads"]
        head_dim = head_dim or LLAMA2_7B["head_dim"]
    if kv_heads % tensor_parallel:
        raise InputError(
            f"--tensor-parallel {tensor_parallel} does not divide the {kv_heads} KV heads; "
            "use a divisor of the KV head count"
        )
    tp = tensor_parallel
    weight_bytes = math.ceil(n_params * PARAM_BYTES[dtype])
    weights_per_device = math.ceil(weight_bytes / tp)
    kv_token_total = 2 * layers * kv_heads * head_dim * KV_BYTES[dtype]  # K and V
    kv_token = kv_token_total // tp  # each device holds its share of the KV heads
    kv_seq = kv_token * context
    device_bytes = round(gpu_gb * 1e9)
    usable = round(device_bytes * (1 - overhead))
    fits = weights_per_device <= usable
    free = max(0, usable - weights_per_device)
    max_seqs = free // kv_seq if fits else 0
    recommended_free = max(0, round(device_bytes * (1 - RECOMMENDED_HEADROOM)) - weights_per_device)
    notes.append(
        f"KV cache stored in {KV_BYTES[dtype]} bytes per element "
        "(fp32: 4; fp16, bf16 and weight-only int8/int4: 2)"
    )
    if not fits:
        notes.append(
            f"weights need {weights_per_device / 1e9:.2f} GB per device but only "
            f"{usable / 1e9:.2f} GB are usable: use a smaller dtype or more devices"
        )
    elif max_seqs == 0:
        notes.append(f"weights fit but not one {context:,}-token sequence: shorten --context")
    result = {
        "model": model_path,
        "params": n_params,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden": hidden,
        "dtype": dtype,
        "bytes_per_param": PARAM_BYTES[dtype],
        "kv_bytes_per_element": KV_BYTES[dtype],
        "gpu_gb": gpu_gb,
        "context": context,
        "tensor_parallel": tp,
        "overhead": overhead,
        "weights_gb": weights_per_device / 1e9,
        "weights_gb_total": weight_bytes / 1e9,
        "kv_bytes_per_token": kv_token,
        "kv_bytes_per_token_total": kv_token_total,
        "kv_gb_per_sequence": kv_seq / 1e9,
        "free_gb_for_kv": free / 1e9,
        "fits": fits,
        "max_sequences": max_seqs,
        "max_sequences_with_headroom": recommended_free // kv_seq if fits else 0,
        "notes": notes,
    }
    result["vllm_command"], result["vllm_note"] = _vllm_command(result)
    return result


def _load_model_config(model: str):
    from lmstack.model.weights import BUNDLED, load_config, resolve_model

    if model == BUNDLED:
        directory = resolve_model(BUNDLED)
    else:
        # Planning needs only config.json, so a directory without weights is fine here.
        directory = Path(model).expanduser()
        if not (directory / "config.json").is_file():
            raise InputError(f"--model {model}: no config.json in that directory")
    return load_config(directory), str(directory)


def _vllm_command(plan: dict) -> tuple[str, str]:
    dtype = plan["dtype"]
    utilization = round(1 - plan["overhead"], 2) if plan["overhead"] > 0 else 0.90
    parts = [f"vllm serve {plan['model']}"]
    if plan["tensor_parallel"] > 1:
        parts.append(f"--tensor-parallel-size {plan['tensor_parallel']}")
    if dtype in VLLM_DTYPE:
        parts.append(f"--dtype {VLLM_DTYPE[dtype]}")
        note = ""
    else:
        # vLLM does not quantize at load time: the weights must already be int8/int4.
        parts += ["--dtype float16", f"--quantization {VLLM_QUANTIZATION[dtype]}"]
        note = (
            f"{dtype} needs a quantized checkpoint (e.g. AWQ or GPTQ); vLLM reads the method "
            "from its config, --quantization awq/gptq must match it"
        )
    parts += [
        f"--gpu-memory-utilization {utilization:.2f}",
        f"--max-num-seqs {max(1, plan['max_sequences'])}",
        f"--max-model-len {plan['context']}",
    ]
    if not plan["fits"]:
        note = "the weights do not fit, so this will not load as planned. " + note
    return " ".join(parts), note.strip()
