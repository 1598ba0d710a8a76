"""The compiled CPU kernels against the torch code they replace, and their fallbacks."""

from __future__ import annotations

import pytest
import torch

from lmstack import kernels
from lmstack.kernels import ops

pytestmark = pytest.mark.skipif(kernels.load() is None, reason=f"kernels {kernels.status()}")


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
    # bf16 with head size 64 and 1, 2, 3, 4 or 8 query heads per KV head takes the AVX512-BF16
    # kernel where there is one; head size 48 or 128, 16 per KV head and fp32: the generic one
    [
        (9, 3, 64),
        (4, 4, 64),
        (8, 4, 64),
        (12, 3, 64),
        (16, 2, 64),
        (8, 2, 128),
        (6, 1, 48),
        (32, 2, 64),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_attention(heads, kv_heads, dim, dtype):
    # Lengths straddle block edges (1, 15, 16, 17) and differ within the batch.
    lengths = [1, 15, 16, 17, 200, 33]
    q, pool, tables, lens = _case(heads, kv_heads, dim, lengths, dtype)
    out = ops.paged_decode(q, pool, tables, lens)
    assert out.dtype == dtype and out.shape == q.shape
    ref = _reference(q, pool, tables, lens)
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # bf16: the output's own rounding
    assert (out.float() - ref).abs().max().item() < tol
    # A length-1 sequence sees only its own token: the output is exactly its value row.
    first_v = pool[1][:, tables[0, 0], 0].float().repeat_interleave(heads // kv_heads, 0)
    assert torch.allclose(out[0].float(), first_v, atol=tol)


def test_kernel_uses_torchs_openmp_runtime():
    # A second OpenMP runtime would start its own worker threads beside torch's on the same
    # cores. With torch's, the kernel's parallel loop runs on the team torch already has.
    # (Other packages may map their own libgomp under another name, e.g. faiss's; only
    # what the kernel binds to matters.)
    import os

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no team to share")
    torch.randn(512, 512) @ torch.randn(512, 512)  # this thread's torch team exists
    torch.ones(1 << 20).exp_()
    before = len(os.listdir("/proc/self/task"))
    q, pool, tables, lengths = _case(9, 3, 64, [40] * 12, torch.float32)
    for _ in range(5):
        ops.paged_decode(q, pool, tables, lengths)
    assert len(os.listdir("/proc/self/task")) == before


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
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LMSTACK_KERNELS", "0")
    assert kernels.load() is None
    assert "LMSTACK_KERNELS=0" in kernels.status()
    q, pool, _, _ = _case(9, 3, 64, [5], torch.float32)
    with torch.inference_mode():
        assert not ops.supports_paged(q, pool)

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv("LMSTACK_KERNELS")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMSTACK_CACHE", str(tmp_path / "cache"))
    assert kernels.load() is None
    assert "no-such-compiler" in kernels.status()


def test_kernels_stay_out_of_autograd():
    x = torch.randn(4, 8, requires_grad=True)
    assert not ops.usable(x)  # grad enabled: the torch path records the graph
    with torch.no_grad():
        assert ops.usable(x)
    with kernels.disabled():
        assert kernels.load() is None and "disabled" in kernels.status()
    assert kernels.load() is not None


def _torch_rms(x, w, eps):
    return w * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_kernels_match_torch(dtype):
    from lmstack.model.llama import RotaryEmbedding, apply_rotary

    gen = torch.Generator().manual_seed(1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x = torch.randn(7, 576, generator=gen).to(dtype)
    delta = torch.randn(7, 576, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(576, generator=gen)).to(dtype)
    with torch.inference_mode():
        assert (ops.rms_norm(x, w, 1e-5).float() - _torch_rms(x, w, 1e-5).float()).abs().max() < tol
        residual = x.clone()
        fused = ops.rms_norm(residual, w, 1e-5, delta=delta)
        assert torch.equal(residual, x + delta)  # the add rounds exactly as torch's
        expected = _torch_rms(x + delta, w, 1e-5)
        assert (fused.float() - expected.float()).abs().max() < tol

        rot = RotaryEmbedding(64, 512, 10000.0)
        positions = torch.tensor([0, 1, 5, 300, 511, 2, 9])
        qkv = torch.randn(7, 15, 64, generator=gen).to(dtype)  # 9 q + 3 k + 3 v heads
        cos, sin = rot.cos[positions][:, None].to(dtype), rot.sin[positions][:, None].to(dtype)
        reference = apply_rotary(qkv[:, :12], (cos, sin))
        ops.rope_(qkv[:, :12], positions, rot.cos, rot.sin)  # in place, inside the wider row
        assert (qkv[:, :12].float() - reference.float()).abs().max() < 2 * tol
        assert torch.equal(qkv[0, :12], reference[0])  # position 0 is the identity

        gate_up = torch.randn(7, 2 * 1536, generator=gen).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        torch_silu = torch.nn.functional.silu(gate) * up
        assert (ops.silu_mul(gate_up).float() - torch_silu.float()).abs().max() < 2 * tol


def test_model_logits_with_and_without_kernels(model):
    model = model[0]
    ids = torch.tensor([1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2])
    from lmstack.model.cache import NoCache

    with torch.inference_mode():
        fast = model(ids, torch.arange(len(ids)), NoCache())
        with kernels.disabled():
            slow = model(ids, torch.arange(len(ids)), NoCache())
    assert (fast - slow).abs().max().item() < 1e-4


def test_kernels_in_another_thread_follow_torchs_thread_count():
    # What AsyncLLMEngine(exclusive_threads=True) leaves for every thread but the engine's:
    # one torch thread. A kernel called there must not form an OpenMP team of all the cores.
    import os
    import threading

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    counts = []

    def work():
        start = len(os.listdir("/proc/self/task"))
        with torch.inference_mode():
            ops.rms_norm(torch.randn(512, 576), torch.ones(576), 1e-5)
            ops.silu_mul(torch.randn(512, 3072))
            if ops.linear_bf16_supported():
                w = ops.pack_bf16(torch.randn(576, 576).bfloat16())
                ops.linear_bf16(torch.randn(64, 576).bfloat16(), w, 576)
        counts.append((start, len(os.listdir("/proc/self/task"))))

    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert counts[0][1] == counts[0][0]


needs_bf16_linear = pytest.mark.skipif(
    not ops.linear_bf16_supported(), reason="no AVX512-BF16: bf16 layers use oneDNN"
)


def test_bf16_linear_falls_back_where_the_cpu_lacks_avx512_bf16():
    # Where the kernel is compiled (AVX512-BF16) it runs; elsewhere it is a stub that refuses
    # every call, the model never packs for it, and a KernelLinear computes F.linear.
    from lmstack.model.packed import KernelLinear, kernel_supported

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen).bfloat16()
    x = torch.randn(7, 64, generator=gen).bfloat16()
    assert kernel_supported(w) == ops.linear_bf16_supported()
    with torch.inference_mode():
        out = KernelLinear(w)(x)
        if ops.linear_bf16_supported():
            # The output is rounded to bf16 (8 significant bits): relative to its magnitude.
            ref = x.float() @ w.float().T
            assert ((out.float() - ref).abs() <= 2**-8 * ref.abs() + 1e-3).all()
        else:
            assert torch.equal(out, torch.nn.functional.linear(x, w))
            with pytest.raises(ValueError, match="refused"):
                ops.linear_bf16(x, ops.pack_bf16(w), 96)


@needs_bf16_linear
@pytest.mark.parametrize("rows", [1, 5, 20, 37, 257])
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (100, 576), (49152, 64)])
def test_linear_bf16_matches_an_fp32_reference(rows, n, k):
    # Rows cover one tile, uneven tiles and the split of rows between threads (257 x 576);
    # n = 100 ends in a partly filled block of columns.
    gen = torch.Generator().manual_seed(rows * n)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    out = ops.linear_bf16(x, ops.pack_bf16(w), n)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    ref = x.double() @ w.double().T
    # fp32 sums rounded once to bf16: within one bf16 step (2^-8 relative) of the exact value.
    err = (out.double() - ref).abs() - ref.abs() * 2**-8
    assert err.max().item() < 1e-3


@needs_bf16_linear
def test_linear_bf16_takes_strided_rows_and_leading_dims():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(192, 128, generator=gen).bfloat16()
    wide = torch.randn(6, 300, generator=gen).bfloat16()
    x = wide[:, 40:168]  # rows 300 apart
    packed = ops.pack_bf16(w)
    strided = ops.linear_bf16(x, packed, 192)
    assert torch.equal(strided, ops.linear_bf16(x.contiguous(), packed, 192))
    batch = torch.randn(2, 3, 128, generator=gen).bfloat16()
    out = ops.linear_bf16(batch, packed, 192)
    assert out.shape == (2, 3, 192)
    assert torch.equal(out.view(6, 192), ops.linear_bf16(batch.view(6, 128), packed, 192))
    assert ops.linear_bf16(torch.empty(0, 128).bfloat16(), packed, 192).shape == (0, 192)


def test_pack_bf16_round_trips_and_refuses_bad_shapes():
    w = torch.randn(100, 64).bfloat16()
    packed = ops.pack_bf16(w)
    assert packed.shape == (2, 32, 64, 2)
    assert torch.equal(ops.unpack_bf16(packed, 100), w)
    assert packed.view(-1, 2)[32 * 64 * 2 - 1 :].abs().sum() >= 0  # padding exists, readable
    with pytest.raises(ValueError, match="even number of input features, got 63"):
        ops.pack_bf16(torch.randn(8, 63).bfloat16())
    with pytest.raises(ValueError, match="width 64"):
        ops.linear_bf16(torch.randn(3, 32).bfloat16(), packed, 100)


@needs_bf16_linear
def test_kernel_linear_falls_back_to_f_linear_when_kernels_are_off():
    from lmstack.model.packed import KernelLinear

    w = torch.randn(96, 64).bfloat16()
    x = torch.randn(7, 64).bfloat16()
    layer = KernelLinear(w)
    with torch.inference_mode():
        fast = layer(x)
        with kernels.disabled():
            slow = layer(x)
    assert torch.equal(slow, torch.nn.functional.linear(x, w))
    assert (fast.float() - slow.float()).abs().max() <= 2**-7 * slow.float().abs().max()


@pytest.mark.parametrize(
    ("tokens", "start"), [(1, 0), (2, 0), (17, 0), (136, 0), (5, 40), (7, 16), (33, 200)]
)
@pytest.mark.parametrize(
    "heads,kv_heads,dim", [(9, 3, 64), (4, 4, 64), (8, 4, 64), (16, 4, 64), (8, 1, 64), (8, 2, 128)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_chunk_attends_causally_over_its_blocks(tokens, start, heads, kv_heads, dim, dtype):
    # A chunk of `tokens` queries at positions start.. over one sequence's scattered blocks:
    # query i sees keys 0..start+i, as a causal mask over the gathered sequence would allow.
    # Head size 64 with 1-4 or 8 query heads per KV head takes the tiled kernel (16 query
    # rows per pass; tiles that end mid-chunk, chunks that start mid-block); 128 the
    # per-query one. In fp32 (AVX2+FMA) the tiled kernel takes up to 8 query heads per KV
    # head (16 x 4 goes per query) and head sizes up to 128, 8 query rows per pass.
    q, pool, tables, _ = _case(heads, kv_heads, dim, [start + tokens], dtype, seed=tokens)
    q = torch.randn(tokens, heads, dim, generator=torch.Generator().manual_seed(start)).to(dtype)
    expanded = tables[0].view(1, -1).expand(tokens, -1)
    lengths = torch.arange(start + 1, start + tokens + 1)
    with torch.inference_mode():
        out = ops.paged_prefill(q, pool, tables[0], start)
        per_query = ops.paged_decode(q, pool, expanded.contiguous(), lengths)
    ref = _reference(q, pool, expanded, lengths)
    # Within one bf16 step of the largest output (the tiled kernel also rounds softmax
    # weights to bf16 for the weighted sum, which the per-query one does not).
    tolerance = max(8e-3, 2**-7 * ref.abs().max().item()) if dtype == torch.bfloat16 else 2e-5
    assert out.shape == q.shape and (out.float() - ref).abs().max().item() < tolerance
    assert (out.float() - per_query.float()).abs().max().item() < tolerance


def test_tiled_prefill_runs_where_it_applies_and_refuses_other_shapes():
    lib = kernels.load()
    q, pool, tables, _ = _case(9, 3, 64, [40], torch.bfloat16)
    q = torch.randn(40, 9, 64).bfloat16()
    out = torch.empty_like(q)

    def call(heads, kv_heads, dim):
        args = (q.data_ptr(), pool.data_ptr(), tables[0].data_ptr(), 0, 40, out.data_ptr())
        return lib.lmstack_paged_prefill_bf16(*args, heads, kv_heads, pool.shape[2], 16, dim, 2,
                                              0.125)  # fmt: skip

    # Without AVX512-BF16 the tiled kernel is a stub that takes no shape (the caller then
    # runs one decode-style task per query: test_prefill_chunk_attends_causally_...).
    assert call(9, 3, 64) == (1 if ops.linear_bf16_supported() else 0)
    assert call(9, 3, 128) == 0 and call(32, 2, 64) == 0 and call(9, 2, 64) == 0


@pytest.mark.parametrize("group", [1, 3, 8])
def test_tiled_prefill_over_a_long_context(group):
    # The tiled kernel on AVX512-BF16, the per-query fallback elsewhere: the same result.
    # 160 queries after 1,000 keys (a late chunk of a long prompt), 20 blocks of 64 tokens:
    # every tile walks ~70 blocks of keys with the online softmax rescaling as it goes.
    q, pool, tables, _ = _case(2 * group, 2, 64, [1160], torch.bfloat16, block_size=64, seed=5)
    q = (2 * torch.randn(160, 2 * group, 64)).bfloat16()  # sharper softmax
    lengths = torch.arange(1001, 1161)
    with torch.inference_mode():
        out = ops.paged_prefill(q, pool, tables[0], 1000)
    ref = _reference(q, pool, tables[0].view(1, -1).expand(160, -1), lengths)
    assert (out.float() - ref).abs().max().item() < 2**-7 * ref.abs().max().item()


def test_loading_the_kernels_keeps_subnormal_floats():
    # A library linked with -ffast-math turns on flush-to-zero for the whole process when
    # it loads: every float in torch, numpy and Python would then lose its subnormals.
    import subprocess
    import sys

    probe = (
        "import torch\n"
        "from lmstack import kernels\n"
        "from lmstack.kernels import ops\n"
        "assert kernels.load() is not None, kernels.status()\n"
        "x = torch.tensor([1e-40])\n"
        "with torch.no_grad():\n"
        "    ops.rms_norm(torch.ones(1, 64), torch.ones(64), 1e-5)\n"
        "print(5e-324 * 1.0 > 0, float((x * 1.0)[0]) > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
