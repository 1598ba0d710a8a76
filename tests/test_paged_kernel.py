"""The compiled paged decode-attention kernel against plain attention, and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from lmstack.engine import paged_kernel

pytestmark = pytest.mark.skipif(
    paged_kernel.load() is None, reason=f"kernel {paged_kernel.status()}"
)


def _case(heads, kv_heads, dim, lengths, dtype, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max((n + block_size - 1) // block_size for n in lengths)
    num_blocks = len(lengths) * width + 7
    pool = torch.randn(2, kv_heads, num_blocks, block_size, dim, generator=gen).to(dtype)
    # Blocks scattered over the pool, as after a while of allocations and frees.
    tables = torch.randperm(num_blocks, generator=gen)[: len(lengths) * width].view(-1, width)
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    return q, pool, tables, torch.tensor(lengths, dtype=torch.long)


def _reference(q, pool, tables, lengths):
    batch, heads, dim = q.shape
    kv_heads = pool.shape[1]
    out = torch.empty(batch, heads, dim)
    for b in range(batch):
        n = int(lengths[b])
        k = pool[0][:, tables[b]].reshape(kv_heads, -1, dim)[:, :n].double()
        v = pool[1][:, tables[b]].reshape(kv_heads, -1, dim)[:, :n].double()
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        w = torch.softmax(q[b].double()[:, None, :] @ k.transpose(1, 2) / dim**0.5, dim=-1)
        out[b] = (w @ v)[:, 0].float()
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,dim",
    [(9, 3, 64), (4, 4, 64), (8, 2, 128), (6, 1, 48), (32, 2, 64)],  # 48 and 16/1: generic
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_attention(heads, kv_heads, dim, dtype):
    # Lengths straddle block edges (1, 15, 16, 17) and differ within the batch.
    lengths = [1, 15, 16, 17, 200, 33]
    q, pool, tables, lens = _case(heads, kv_heads, dim, lengths, dtype)
    out = paged_kernel.paged_decode(q, pool, tables, lens)
    assert out.dtype == dtype and out.shape == q.shape
    ref = _reference(q, pool, tables, lens)
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding
    assert (out.float() - ref).abs().max().item() < tol
    # A length-1 sequence sees only its own token: the output is exactly its value row.
    first_v = pool[1][:, tables[0, 0], 0].float().repeat_interleave(heads // kv_heads, 0)
    assert torch.allclose(out[0].float(), first_v, atol=tol)


def test_kernel_uses_torchs_openmp_runtime():
    # A second libgomp would start its own thread pool beside torch's on the same cores.
    with open("/proc/self/maps") as maps:
        gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


def test_engine_decodes_the_same_tokens_with_and_without_the_kernel(model):
    from lmstack.engine.llm_engine import LLMEngine
    from lmstack.engine.sampling_params import SamplingParams

    engine = LLMEngine(dtype="float32", num_kv_tokens=4096)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = []
    for use_kernel in (True, False):
        engine.runner.use_kernel = use_kernel
        ids = [engine.add_request(p, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
        runs.append([done[i] for i in ids])
    assert runs[0] == runs[1]


def test_disabled_or_unbuildable_kernel_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(paged_kernel, "_state", {})
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    assert paged_kernel.load() is None
    assert "LMSTACK_KERNELS=0" in paged_kernel.status()
    q, pool, _, _ = _case(9, 3, 64, [5], torch.float32)
    assert not paged_kernel.supports(q, pool)

    monkeypatch.setattr(paged_kernel, "_state", {})
    monkeypatch.delenv("LMSTACK_KERNELS")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    assert paged_kernel.load() is None
    assert "no-such-compiler" in paged_kernel.status()
