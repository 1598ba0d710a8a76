"""Pre-packed linear layers (oneDNN, and lmstack's bf16 kernel) and the fused prefill
attention path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import data_dir
from lmstack.kernels import ops
from lmstack.model.attention import reference_attention, sdpa
from lmstack.model.cache import NoCache
from lmstack.model.packed import KernelLinear, PackedLinear, pack_linears, packing_supported

DATA = data_dir() / "nist-sp800-63-3"
needs_bf16 = pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="no oneDNN bf16 on this CPU"
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 20, 257])
def test_packed_bf16_is_bit_identical_to_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(960, 576, generator=gen).bfloat16()
    x = torch.randn(rows, 576, generator=gen).bfloat16()
    assert torch.equal(PackedLinear(w)(x), F.linear(x, w))


@pytest.mark.skipif(not packing_supported(torch.float32), reason="no oneDNN")
def test_packed_fp32_matches_f_linear():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(1536, 576, generator=gen), torch.randn(20, 576, generator=gen)
    torch.testing.assert_close(PackedLinear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_pack_linears_skips_biased_and_unsupported_layers():
    net = nn.Sequential(
        nn.Linear(8, 8, bias=False),
        nn.Linear(8, 8, bias=True),
        nn.Linear(8, 8, bias=False).to(torch.float64),
    )
    assert pack_linears(net) == (1 if packing_supported(torch.float32) else 0)
    assert type(net[1]) is nn.Linear and type(net[2]) is nn.Linear


def test_bf16_model_stays_unpacked_where_onednn_has_no_bf16():
    # The fallback on AVX2-only CPUs: pack_linears packs nothing in bf16, so F.linear runs.
    if packing_supported(torch.bfloat16):
        pytest.skip("this CPU has oneDNN bf16: test_loaded_model_is_packed_and_unchanged")
    net = nn.Sequential(nn.Linear(64, 64, bias=False)).bfloat16()
    assert pack_linears(net) == 0 and type(net[0]) is nn.Linear


@needs_bf16
def test_loaded_model_is_packed_and_unchanged(model):
    from lmstack.model.llama import LlamaForCausalLM

    packed = LlamaForCausalLM.from_pretrained("bundled", "bfloat16")
    plain = LlamaForCausalLM.from_pretrained("bundled", "bfloat16", pack=False)
    kind = KernelLinear if ops.linear_bf16_supported() else PackedLinear
    assert sum(isinstance(m, kind) for m in packed.modules()) == 4 * 30 + 1
    assert not any(isinstance(m, (KernelLinear, PackedLinear)) for m in plain.modules())
    text = (DATA / "sec4_model.md").read_text()[:3000]
    ids = torch.tensor(model[1].encode(text)[:400])
    pos = torch.arange(len(ids))
    a = packed.compute_logits(packed(ids, pos, NoCache()))
    b = plain.compute_logits(plain(ids, pos, NoCache()))
    if kind is PackedLinear:
        assert torch.equal(a, b)  # oneDNN computes exactly what F.linear does
    else:
        # The kernel sums in another order, so its bf16 outputs may differ from F.linear's
        # in the last bit: as close to the fp32 model as plain bf16 is, not bit-identical.
        exact = model[0].compute_logits(model[0](ids, pos, NoCache()))
        top = exact.argmax(-1)
        agree_kernel = (a.argmax(-1) == top).float().mean().item()
        agree_plain = (b.argmax(-1) == top).float().mean().item()
        assert agree_kernel >= agree_plain - 0.02 and agree_kernel > 0.95
        assert (a - exact).abs().mean() <= 1.25 * (b - exact).abs().mean()
    # The tied LM head gets its own packed copy: memory grows by one embedding matrix only
    # (the kernel's layout pads columns to blocks of 64; the bundled model's need none).
    embed = packed.model.embed_tokens.weight
    assert packed.weight_bytes() == plain.weight_bytes() + embed.numel() * embed.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "keys"), [(130, 130), (40, 200), (1, 90)])
def test_fused_sdpa_matches_reference(dtype, tokens, keys):
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(9, tokens, 64, generator=gen)
    k, v = torch.randn(3, keys, 64, generator=gen), torch.randn(3, keys, 64, generator=gen)
    ref = reference_attention(q, k, v, causal=True).output
    out = sdpa(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
