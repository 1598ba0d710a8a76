"""GGUF block formats (Q4_1, Q4_0, Q8_0) in the integer kernel, and the precision chosen for
the CPU (`--dtype auto`, LMSTACK_CPU_ISA)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmstack import cpu, kernels
from lmstack.errors import InputError
from lmstack.kernels import qops
from lmstack.model import precision
from lmstack.model.cache import NoCache
from lmstack.model.llama import fuse_hf_state_dict
from lmstack.model.qlinear import (
    GGUFBlocks,
    QuantLinear,
    decode_gguf_blocks,
    pack_float,
    quantize_q4_0,
    quantize_q4_1,
    quantize_q8_0,
)
from lmstack.model.weights import bundled_gguf_path, load_state_dict, resolve_model

needs_kernel = pytest.mark.skipif(
    not qops.linear_q_supported(), reason=f"no AVX2/FMA/F16C kernel ({kernels.status()})"
)


def _q4_weight(n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, d, m = quantize_q4_1(w)
    blocks = (q.view(n, -1, 32).float() * d.float()[..., None] + m.float()[..., None]).view(n, k)
    return qops.pack_q4(q, d, m), blocks


def _q8_weight(n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, d = quantize_q8_0(w)
    return qops.pack_q8(q, d), (q.view(n, -1, 32).float() * d.float()[..., None]).view(n, k)


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: rounded to int8 per block of 32 (scale max|x| / 127)."""
    blocks = x.view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale) * scale).view(x.shape)


@pytest.mark.parametrize("bits", [4, 8])
def test_tiles_round_trip_exactly(bits):
    packed, weight = (_q4_weight if bits == 4 else _q8_weight)(100, 576)
    assert packed.shape == (13, 18, qops.Q4_TILE if bits == 4 else qops.Q8_TILE)
    assert torch.equal(qops.dequantize_tiles(packed, 100, bits), weight)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 20, 33])
@pytest.mark.parametrize(("n", "k"), [(100, 576), (960, 576), (576, 1536)])
def test_kernel_computes_the_int8_activation_product(bits, rows, n, k):
    # Exactly sum(w * xq) per output: the only rounding is the activations' int8 one, so the
    # kernel matches fp64 arithmetic on those rounded inputs to fp32 accuracy. Row counts
    # cover full and partial 4-row tiles; n = 100 ends in a partial group of 8 columns.
    packed, weight = (_q4_weight if bits == 4 else _q8_weight)(n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(n + rows))
    out = qops.linear_q(x, packed, n, bits)
    ref = _int8_activations(x).double() @ weight.double().T
    assert out.shape == (rows, n)
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max() + 1e-5
    # and it is close to the unrounded product (int8 activations lose ~1%, not more)
    exact = x.double() @ weight.double().T
    assert (out.double() - exact).abs().max() < 0.03 * exact.abs().max()


@needs_kernel
def test_kernel_uses_vnni_exactly_where_the_cpu_has_it():
    # vpdpbusd (AVX512-VNNI on 256-bit vectors) where the CPU and LMSTACK_CPU_ISA allow it,
    # vpmaddubsw otherwise; test_kernel_computes_the_int8_activation_product checks whichever
    # this run built (make test-avx2 runs it on the AVX2 one).
    from lmstack import cpu

    vnni = {"avx512_vnni", "avx512vl"} <= cpu.features()
    assert qops.linear_q_path() == ("avx512_vnni" if vnni else "avx2")


@needs_kernel
def test_kernel_takes_strided_rows_leading_dims_and_no_rows():
    packed, weight = _q4_weight(64, 64)
    wide = torch.randn(6, 200)
    x = wide[:, 10:74]
    assert torch.equal(
        qops.linear_q(x, packed, 64, 4), qops.linear_q(x.contiguous(), packed, 64, 4)
    )
    batch = torch.randn(2, 3, 64)
    assert qops.linear_q(batch, packed, 64, 4).shape == (2, 3, 64)
    assert qops.linear_q(torch.empty(0, 64), packed, 64, 4).shape == (0, 64)
    with pytest.raises(ValueError, match="width 64"):
        qops.linear_q(torch.randn(2, 32), packed, 64, 4)
    with pytest.raises(ValueError, match="fp32"):
        qops.linear_q(torch.randn(2, 64).bfloat16(), packed, 64, 4)


def test_packers_refuse_widths_that_are_not_whole_blocks():
    with pytest.raises(InputError, match="multiple of 32 inputs, got 40"):
        quantize_q8_0(torch.randn(8, 40))
    with pytest.raises(ValueError, match="k % 32"):
        qops.pack_q8(torch.zeros(8, 40, dtype=torch.int8), torch.zeros(8, 1).half())


def test_quantizers_follow_the_formats():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    q, d = quantize_q8_0(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert (q.view(16, 2, 32).float() * d.float()[..., None] - w.view(16, 2, 32)).abs().max() < (
        d.float().max() * 0.51
    )
    for quantize in (quantize_q4_1, quantize_q4_0):
        q, d, m = quantize(w)
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        back = q.view(16, 2, 32).float() * d.float()[..., None] + m.float()[..., None]
        assert (back - w.view(16, 2, 32)).abs().max() < d.float().abs().max() * 0.6
    _, d0, m0 = quantize_q4_0(w)
    assert torch.equal(m0.float(), -8 * d0.float())  # Q4_0 is Q4_1 with m = -8 d


def test_gguf_blocks_decode_to_what_gguf_dequantizes():
    # The bundled file's own blocks (Q4_1 layers, Q8_0 embedding), decoded by lmstack, equal
    # the gguf library's dequantization: nothing is lost against the file.
    import gguf

    blocks = GGUFBlocks(bundled_gguf_path())
    for name in ("blk.0.ffn_down.weight", "token_embd.weight"):
        t = blocks.tensors[name]
        parts = decode_gguf_blocks(t.tensor_type.name, np.asarray(t.data), int(t.shape[0]))
        q, d = parts[0].float(), parts[1].float()
        n, k = q.shape
        w = q.view(n, -1, 32) * d[..., None]
        if len(parts) == 3:
            w = w + parts[2].float()[..., None]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        torch.testing.assert_close(w.view(n, k), ref, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def gguf_net():
    from lmstack.model.llama import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained("bundled", "gguf")


def test_gguf_model_keeps_the_files_blocks_and_matches_fp32(model, gguf_net):
    net = gguf_net
    layers = [m for m in net.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * 30 + 1 and all(m.source == "gguf" for m in layers)
    assert sum(m.bits == 8 for m in layers) == 1  # the LM head: the file's Q8_0 embedding
    copies = sum(m.bf16.numel() * 2 for m in layers if m.bf16 is not None)
    assert net.weight_bytes() - copies < 0.4 * model[0].weight_bytes()
    # The dequantized tiles are the fp32 model's weights (same file, same values; RoPE rows
    # of q and k un-interleaved alike), to fp32 rounding of d * q + m.
    state = fuse_hf_state_dict(load_state_dict(resolve_model("bundled")), 30)
    for i, name in ((3, "self_attn.qkv_proj"), (7, "mlp.gate_up_proj")):
        parent, attr = name.split(".")
        ours = getattr(getattr(net.model.layers[i], parent), attr).dequantized()
        torch.testing.assert_close(
            ours, state[f"model.layers.{i}.{name}.weight"], rtol=0, atol=1e-6
        )
    fp32 = model[0]
    text = "The digital identity guidelines define assurance levels for authenticators. " * 8
    ids = torch.tensor(model[1].encode(text))
    pos = torch.arange(len(ids))
    a = net.compute_logits(net(ids, pos, NoCache()))
    b = fp32.compute_logits(fp32(ids, pos, NoCache()))
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    nll_q = F.cross_entropy(a[:-1], ids[1:]).item()
    nll_f = F.cross_entropy(b[:-1], ids[1:]).item()
    assert abs(nll_q - nll_f) < 0.02 * nll_f + 0.01


def test_prompt_chunks_take_a_bf16_copy_exactly_where_the_cpu_multiplies_bf16(gguf_net):
    # On AVX512-BF16/AMX CPUs each decoder layer keeps a bf16 copy of its dequantized blocks
    # for steps of BF16_MIN_ROWS rows or more (prefill is compute-bound; the bf16 kernel is
    # the faster one there); smaller steps and the LM head stay on the integer kernel.
    from lmstack.kernels import ops
    from lmstack.model.qlinear import BF16_MIN_ROWS

    native = cpu.native_bf16() and ops.linear_bf16_supported()
    layers = [m for m in gguf_net.model.modules() if isinstance(m, QuantLinear)]
    assert all((m.bf16 is not None) == native for m in layers)
    assert gguf_net.lm_head.bf16 is None and gguf_net.model.bf16_prefill == native
    assert ("bf16 copy" in gguf_net.dtype_reason) == native
    lin = gguf_net.model.layers[2].mlp.gate_up_proj
    weight = lin.dequantized()
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for rows in (BF16_MIN_ROWS - 1, BF16_MIN_ROWS, 130):
            x = torch.randn(rows, lin.in_features, generator=gen)
            out = lin(x)
            assert out.dtype == torch.float32 and out.shape == (rows, lin.out_features)
            if native and rows >= BF16_MIN_ROWS:
                ref = F.linear(x.bfloat16().float(), weight.bfloat16().float())
                assert ((out - ref).abs() <= 2**-7 * ref.abs() + 1e-2).all()
            else:
                assert torch.equal(out, qops.linear_q(x, lin.packed, lin.out_features, lin.bits))


def test_quantized_layer_falls_back_to_its_dequantized_weight():
    packed, weight = _q8_weight(32, 64)
    layer = QuantLinear(packed, 32, 8, "quantized")
    x = torch.randn(3, 64)
    with torch.inference_mode(), kernels.disabled():
        slow = layer(x)
    torch.testing.assert_close(slow, F.linear(x, weight))
    with torch.inference_mode():
        fast = layer(x)
    assert (fast - slow).abs().max() < 0.03 * slow.abs().max()
    assert torch.equal(pack_float(weight, "q8_0"), packed)  # re-quantizing Q8_0 is exact


def test_auto_dtype_follows_the_cpu_and_the_model(tmp_path):
    # The bundled GGUF runs its own blocks wherever the integer kernel does (on either CPU
    # kind); a float checkpoint runs bf16 where the CPU has it, Q8_0 elsewhere.
    name, why = precision.choose_dtype("bundled")
    assert name == ("gguf" if qops.linear_q_supported() else "float32")
    assert cpu.isa_level() in why
    name, _ = precision.choose_dtype(tmp_path)  # a directory: an HF checkpoint, no .gguf
    if cpu.native_bf16():
        assert name == "bfloat16"
    elif qops.linear_q_supported():
        assert name == "q8_0"
    else:
        assert name == "float32"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    # A fresh process: the switch must reach the environment before torch loads.
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_isa_switch_restricts_lmstack_torch_and_onednn():
    probe = (
        "import os, lmstack, torch\n"
        "from lmstack import cpu\n"
        "from lmstack.kernels import ops\n"
        "from lmstack.model.precision import choose_dtype\n"
        "from lmstack.kernels import qops\n"
        "print(cpu.isa_level(), choose_dtype('bundled')[0], ops.linear_bf16_supported(),\n"
        "      torch.backends.cpu.get_cpu_capability(), os.environ['ONEDNN_MAX_CPU_ISA'],\n"
        "      qops.linear_q_path())\n"
    )
    result = _run(probe, LMSTACK_CPU_ISA="avx2")
    assert result.returncode == 0, result.stderr
    level, dtype, bf16_kernel, capability, onednn, q_path = result.stdout.split()
    assert level == "avx2" and dtype == "gguf" and bf16_kernel == "False" and q_path == "avx2"
    assert capability == "AVX2" and onednn == "AVX2"
    bad = _run("import lmstack.cpu as c; c.requested_isa()", LMSTACK_CPU_ISA="sse9")
    assert bad.returncode != 0 and "LMSTACK_CPU_ISA='sse9'" in bad.stderr


@needs_kernel
def test_steps_in_one_call_equal_the_per_layer_path():
    # An engine step of a block-quantized model runs all 30 layers in one C call
    # (qops.layer_stack): decode rows, prefill chunks, and steps that mix them (five prompts
    # of different lengths under a small token budget). It calls the same kernels in the
    # same order, so greedy tokens and log-probabilities equal the per-layer path's exactly.
    import random

    from lmstack.engine.llm_engine import LLMEngine
    from lmstack.engine.sampling_params import SamplingParams

    # No prefix cache: the second run must compute every token again, not reuse the first's
    # blocks (a fully cached prompt recomputes its last token as a decode row, through the
    # other attention kernel: equal to ~1e-6, which int8 activations can then amplify).
    engine = LLMEngine(
        dtype="gguf", num_kv_tokens=4096, max_num_batched_tokens=48, enable_prefix_caching=False
    )
    inner = engine.model.model
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(5, 60))] for _ in range(5)]

    def run():
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
        ids = [engine.add_request(p, params) for p in prompts]
        tokens, logprobs = {}, {i: [] for i in ids}
        while engine.has_unfinished_requests():
            for out in engine.step():
                logprobs[out.request_id] += [t.logprob for t in out.new_logprobs or []]
                if out.finished:
                    tokens[out.request_id] = out.token_ids
        return [tokens[i] for i in ids], [logprobs[i] for i in ids]

    fused = run()
    assert inner._stack_args() is not None
    inner.__dict__["_stack"] = ()  # the per-layer path, on the same weights
    try:
        per_layer = run()
    finally:
        del inner.__dict__["_stack"]
    assert fused == per_layer


def test_late_chunks_of_long_prompts_leave_the_one_call_path():
    # fp32 chunks starting 1,024 tokens or more into a sequence gather their blocks for torch's
    # flash attention (faster there than the tiled kernel), so the step runs layer by layer.
    from lmstack.engine.llm_engine import LLMEngine
    from lmstack.engine.model_runner import FP32_TILED_MAX_START, PagedAttention, _Prefill

    engine = LLMEngine(dtype="gguf", num_kv_tokens=4096)
    table = torch.arange(80)
    empty = torch.empty(0, dtype=torch.long)

    def layout(start):
        chunk = _Prefill(0, 4, table, start + 4)
        return PagedAttention(engine.runner, empty, empty, None, None, [chunk]).paged_layout()

    early = layout(FP32_TILED_MAX_START - 1)
    assert early is not None and early[-1].tolist() == [
        [0, 4, FP32_TILED_MAX_START - 1, table.data_ptr()]
    ]
    assert layout(FP32_TILED_MAX_START) is None
