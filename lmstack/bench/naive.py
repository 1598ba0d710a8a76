"""Single-sequence generation with a contiguous KV cache: the simplest correct decoder.

A baseline, not a serving path: one request at a time, the model's plain forward pass, no
paging, batching or fused kernels. Benchmarks measure the engine against it and tests use it
as the reference the engine's greedy output must equal; `lmstack generate` and `chat` run
through the engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmstack.errors import ContextLengthError, InputError
from lmstack.model.cache import DenseKVCache
from lmstack.model.llama import LlamaForCausalLM
from lmstack.model.tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.ttft_s
        return (self.output_tokens - 1) / decode_time if decode_time > 0 else 0.0


def check_sampling(temperature: float, top_p: float, max_tokens: int) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling from softmax(logits / T)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_stream(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    ignore_eos: bool = False,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield generated token ids one at a time; fills `stats` as it goes."""
    check_sampling(temperature, top_p, max_tokens)
    window = model.config.max_position_embeddings
    if not prompt_ids:
        raise InputError("the prompt is empty")
    if len(prompt_ids) >= window:
        raise ContextLengthError(len(prompt_ids), window)
    if len(prompt_ids) + max_tokens > window:
        raise InputError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = "
            f"{len(prompt_ids) + max_tokens} exceeds the context window of {window} tokens"
        )
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = DenseKVCache(model.config, len(prompt_ids) + max_tokens, model.dtype)
    start = time.perf_counter()
    hidden = model(torch.tensor(prompt_ids), torch.arange(len(prompt_ids)), cache)
    logits = model.compute_logits(hidden[-1:])[0]
    position = len(prompt_ids)
    stats.finish_reason = "length"
    for i in range(max_tokens):
        token = sample_token(logits, temperature, top_p, generator)
        if i == 0:
            stats.ttft_s = time.perf_counter() - start
        if token in tokenizer.stop_token_ids and not ignore_eos:
            stats.finish_reason = "stop"
            break
        stats.output_tokens += 1
        stats.token_ids.append(token)
        yield token
        if i + 1 == max_tokens:
            break
        hidden = model(torch.tensor([token]), torch.tensor([position]), cache)
        logits = model.compute_logits(hidden)[0]
        position += 1
    stats.total_s = time.perf_counter() - start
