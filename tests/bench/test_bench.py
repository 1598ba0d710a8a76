"""`lmstack bench` runs end to end at tiny sizes (the real figures come from full runs)."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from lmstack.bench.offline import make_workload, parse_output_len
from lmstack.errors import InputError


def test_workload_is_reproducible_and_sized(model):
    _, tok = model
    a = make_workload(tok, 4, 16, "8:12", seed=3)
    b = make_workload(tok, 4, 16, "8:12", seed=3)
    assert a == b
    assert all(len(p) == 16 for p in a.prompts)
    assert all(8 <= n <= 12 for n in a.output_lens)
    assert not set().union(*map(set, a.prompts)) & tok.special_token_ids


@pytest.mark.parametrize("spec", ["0", "5:3", "x", "1:y"])
def test_bad_output_len(spec):
    with pytest.raises(InputError, match="output-len"):
        parse_output_len(spec)


@pytest.mark.slow
def test_bench_offline_json_against_hf(model, capsys):
    args = ["bench", "offline", "--requests", "2", "--input-len", "8", "--output-len", "4:6"]
    code, out, _ = run_cli(
        [*args, "--baseline", "hf-batch", "--dtype", "float32", "--json"], capsys
    )
    assert code == 0
    result = json.loads(out)
    assert result["engine"]["output_tokens"] == result["baseline"]["output_tokens"]
    assert result["engine"]["output_tokens_per_s"] > 0 and result["speedup"] > 0
    assert result["engine"]["peak_kv_usage"] <= 1.0


def test_bench_offline_rejects_unknown_baseline(model, capsys):
    code, _, err = run_cli(["bench", "offline", "--requests", "1", "--baseline", "vllm"], capsys)
    assert code == 2 and "--baseline 'vllm'" in err


@pytest.mark.slow
def test_bench_precision_reports_each_dtype(model, capsys, tmp_path):
    text = tmp_path / "doc.md"
    text.write_text("Digital identity is the unique representation of a subject. " * 40)
    code, out, _ = run_cli(
        [
            "bench",
            "precision",
            "--text",
            str(text),
            "--max-tokens",
            "256",
            "--window",
            "128",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    rows = json.loads(out)["dtypes"]
    assert set(rows) == {"float32", "bfloat16", "int8", "gguf", "q8_0"}
    weights = {name: row["weights_gb"] for name, row in rows.items()}
    assert weights["int8"] < weights["bfloat16"] < weights["float32"]
    # On CPUs that multiply bf16 natively the block formats also hold a bf16 copy of the
    # decoder layers for prompt steps (lmstack.model.qlinear.add_bf16_prefill): 0.212 GB.
    from lmstack import cpu
    from lmstack.kernels import ops

    copy = 0.215 if cpu.native_bf16() and ops.linear_bf16_supported() else 0.0
    assert weights["gguf"] < weights["q8_0"] < weights["bfloat16"] + copy
    assert weights["gguf"] > copy
    # Quantization may cost a little quality, never a lot.
    for name, row in rows.items():
        assert row["perplexity_vs_fp32"] < 1.1, name
        assert row["greedy_agreement_vs_fp32"] > 0.8, name


def test_bench_kernels_reports_both_sides(capsys, tmp_path):
    import json

    code, out, _ = run_cli(["bench", "kernels", "--json"], capsys)
    assert code == 0
    saved = json.loads(out)
    assert saved["kind"] == "kernels" and saved["meta"]["cpu"]
    rows = saved["rows"]
    from lmstack import kernels
    from lmstack.kernels import qops
    from lmstack.model.precision import choose_dtype

    dtype = choose_dtype("bundled")[0]  # what `--dtype auto` runs on this CPU
    expected = {"prefill attention (causal, GQA)"}
    if kernels.load() is not None:
        expected.add("decode attention (paged, one layer)")
    if dtype == "bfloat16":  # AVX512-BF16: the compiled bf16 kernels
        expected.add("linear (layer + LM head)")
        expected.add("linear, decode step (oneDNN packed vs compiled)")
        expected.add("prefill attention (paged, one layer)")  # the tiled kernel
    elif dtype == "gguf":  # the integer kernel on the file's blocks (either CPU kind)
        expected.add(f"linear (layer + LM head), fp32 packed vs gguf ({qops.linear_q_path()})")
        expected.add("linear, decode step (fp32 oneDNN packed vs gguf)")
        expected.add("prefill attention (paged, one layer)")  # per-query fp32 kernel
    else:
        expected.add("linear (layer + LM head)")
    assert {r["kernel"] for r in rows} == expected
    for r in rows:
        assert r["baseline_ms"] > 0 and r["lmstack_ms"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["lmstack_ms"], rel=0.02)
    # The saved JSON renders into docs/benchmarks.md under its CPU, with date and commit.
    saved_path = tmp_path / "kernels.json"
    saved_path.write_text(out)
    page = tmp_path / "benchmarks.md"
    code, _, _ = run_cli(["bench", "report", str(saved_path), "--out", str(page)], capsys)
    text = page.read_text()
    assert code == 0 and f"## {saved['meta']['cpu']}" in text
    assert all(r["kernel"] in text for r in rows) and saved["meta"]["date"] in text
    (tmp_path / "bad.json").write_text('{"rows": []}')
    code, _, err = run_cli(["bench", "report", str(tmp_path / "bad.json")], capsys)
    assert code == 2 and "bad.json" in err


def test_bench_kernels_rejects_unpackable_dtype(capsys):
    code, _, err = run_cli(["bench", "kernels", "--dtype", "float16"], capsys)
    assert code != 0 and "float16" in err


def test_cpu_description_names_the_generation_behind_a_bare_model_name():
    from lmstack.cpu import describe, generation, isa_level

    # Cloud VMs report "AMD EPYC" for every generation; family/model tell them apart.
    assert generation("AuthenticAMD", 26, 2) == "Zen 5"
    assert generation("AuthenticAMD", 25, 0x11) == "Zen 4"
    assert generation("AuthenticAMD", 25, 0x01) == "Zen 3"
    assert generation("AuthenticAMD", 23, 0x31) == "Zen 2"
    assert generation("GenuineIntel", 6, 143) is None
    line = describe()
    assert line.endswith(f"({isa_level()})") and "family" in line
