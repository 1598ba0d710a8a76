"""The inference engine: continuous batching over a paged KV cache (nano-vllm layout)."""
