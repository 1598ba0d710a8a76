"""EngineConfig: every knob of the engine in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.errors import InputError


@dataclass
class EngineConfig:
    model: str = "bundled"  # "bundled", a .gguf file or a HF directory
    dtype: str = "auto"  # chosen for the CPU (lmstack.cpu); or any of model.llama.DTYPE_NAMES
    max_num_seqs: int = 32  # sequences decoded together
    # Tokens per step: decodes + prefill chunks. Small steps keep TTFT and inter-token
    # latency low: a new prompt waits for the step in flight, then for the step holding its
    # prefill. 20 chat users, 130-token prompts, in-process closed loop: TTFT P50 of the
    # requests after the first burst 164-185 ms at 160 tokens (one prompt per step), 345 at
    # 192, 467-543 at 256 (two arrive together, one is split over two steps), 421 at 512;
    # 1024 had given 2.06 s served. The price is prefill efficiency for long prompts: a
    # 2,000-token prompt alone prefills at ~685 tok/s with 160, ~730 with 256 or 512.
    max_num_batched_tokens: int = 160
    max_waiting: int = 256  # bound of the waiting queue; beyond it add_request is refused
    block_size: int = 16  # tokens per KV block
    kv_cache_gb: float | None = None  # KV pool size in GB (1e9 bytes) ...
    num_kv_tokens: int | None = None  # ... or in tokens; default: 16,384 tokens
    max_model_len: int | None = None  # default: the model's context window
    enable_prefix_caching: bool = True
    default_timeout: float | None = None  # seconds, for requests that set none
    seed: int | None = None  # for unseeded sampling

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise InputError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_kv_tokens is not None and self.num_kv_tokens < self.block_size:
            raise InputError(
                f"num_kv_tokens must be at least one block ({self.block_size}), "
                f"got {self.num_kv_tokens}"
            )
        if self.default_timeout is not None and self.default_timeout <= 0:
            raise InputError(f"default_timeout must be > 0 seconds, got {self.default_timeout}")
