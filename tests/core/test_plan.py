"""`lmstack plan tokens` and `lmstack plan memory`: the worked examples and the bad inputs."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from lmstack.errors import InputError
from lmstack.plan import count_params, parse_count, plan_memory, plan_tokens


def cli_json(args, capsys) -> dict:
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------------------
# plan tokens

REPORT_ARGS = ["plan", "tokens", "--words", "17500", "--window", "8192"]
REPORT_ARGS += ["--system", "200", "--reserve", "500"]


def test_tokens_worked_example_json(capsys):
    plan = cli_json(REPORT_ARGS, capsys)
    assert plan["document_tokens"] == 23275  # 17500 x 1.33
    assert plan["available_tokens"] == 7492  # 8192 - 200 - 500
    assert plan["coverage"] == 0.3219
    assert plan["strategy"] == "rag"
    assert plan["method"] == "rule-of-thumb"
    assert (plan["window"], plan["system"], plan["reserve"]) == (8192, 200, 500)
    assert plan["whole_document_strategy"].startswith("map-reduce")


def test_tokens_worked_example_table(capsys):
    code, out, _ = run_cli(REPORT_ARGS, capsys)
    assert code == 0
    for text in ("23,275", "7,492", "32.2%", "1.33 tokens per English word", "rag"):
        assert text in out


def test_tokens_strategies():
    assert plan_tokens(words=1000)["strategy"] == "stuff"
    assert plan_tokens(words=1000)["coverage"] == 1.0
    # 7,492 available of 10,000: more than half fits, so a two-pass refine suits summaries.
    refine = plan_tokens(words=7519)  # 10,000 tokens
    assert refine["strategy"] == "rag"
    assert refine["whole_document_strategy"].startswith("refine")


def test_tokens_pages_and_chinese(capsys):
    plan = plan_tokens(pages=10)
    assert plan["count"] == 5000 and plan["document_tokens"] == 6650
    assert any("500 words per page" in n for n in plan["notes"])
    zh = plan_tokens(words=3000, language="zh")
    assert zh["unit"] == "characters"
    assert zh["token_range"] == [4500, 6000]
    assert zh["document_tokens"] == 6000  # budgeted at 2.0 per character
    code, out, _ = run_cli(["plan", "tokens", "--words", "3000", "--language", "zh"], capsys)
    assert code == 0 and "4,500-6,000" in out and "budgeted at 2.0" in out


def test_tokens_file_counts_with_tokenizer_and_rule_of_thumb(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    plan = cli_json(["plan", "tokens", "--file", str(doc)], capsys)
    assert plan["method"] == "tokenizer"
    assert plan["count"] == 360
    assert plan["rule_of_thumb_tokens"] == round(360 * 1.33)
    assert plan["document_tokens"] == plan["tokenizer_tokens"]
    assert 300 < plan["tokenizer_tokens"] < 600
    code, out, _ = run_cli(["plan", "tokens", "--file", str(doc)], capsys)
    assert code == 0 and "tokenizer" in out and "rule of thumb" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--words", "-5"], "--words must be greater than 0, got -5"),
        (["--words", "0"], "--words must be greater than 0, got 0"),
        (["--pages", "-1"], "--pages must be greater than 0"),
        (["--words", "100", "--window", "0"], "--window must be greater than 0"),
        (["--words", "100", "--system", "-1"], "--system must be 0 or more"),
        (["--words", "100", "--window", "600"], "200 + --reserve 500 = 700 tokens"),
        ([], "give exactly one of --words, --pages or --file"),
        (["--words", "1", "--pages", "1"], "(got --words, --pages)"),
        (["--file", "/no/such/file.txt"], "no such file"),
        (["--words", "1", "--language", "fr"], "--language must be en or zh, got 'fr'"),
    ],
)
def test_tokens_bad_input(args, message, capsys):
    code, out, err = run_cli(["plan", "tokens", *args], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and out == ""


def test_tokens_non_utf8_file(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8 text"):
        plan_tokens(file=bad)
    code, _, err = run_cli(["plan", "tokens", "--file", str(bad)], capsys)
    assert code == 2 and "not UTF-8" in err


# ---------------------------------------------------------------------------------------
# plan memory


def test_memory_7b_fp32_does_not_fit():
    plan = plan_memory(params="7e9", dtype="fp32", gpu_gb=24)
    assert plan["weights_gb"] == pytest.approx(28.0)
    assert plan["fits"] is False and plan["max_sequences"] == 0
    assert plan["kv_bytes_per_element"] == 4


def test_memory_7b_fp16_worked_example(capsys):
    args = ["plan", "memory", "--params", "7e9", "--dtype", "fp16", "--gpu-gb", "24"]
    plan = cli_json([*args, "--context", "4096"], capsys)
    assert plan["weights_gb"] == pytest.approx(14.0)
    assert plan["free_gb_for_kv"] == pytest.approx(10.0)
    assert plan["kv_bytes_per_token"] == 524_288  # 2 x 32 x 32 x 128 x 2
    assert plan["kv_gb_per_sequence"] == pytest.approx(2.147, abs=1e-3)
    assert plan["fits"] is True and plan["max_sequences"] == 4
    assert plan["vllm_command"] == (
        "vllm serve MODEL --dtype float16 --gpu-memory-utilization 0.90 "
        "--max-num-seqs 4 --max-model-len 4096"
    )
    code, out, _ = run_cli([*args, "--context", "4096"], capsys)
    assert code == 0
    for text in ("14.00 GB", "10.00 GB", "524,288 B", "Llama-2-7B", "2 bytes per element"):
        assert text in out
    assert "--max-num-seqs 4" in out


def test_memory_params_spellings_agree():
    assert parse_count("7B") == parse_count("7e9") == parse_count(7e9) == 7_000_000_000
    assert parse_count("134.5M") == 134_500_000


def test_memory_tensor_parallel_halves_per_device_figures():
    one = plan_memory(params="7B", dtype="fp16")
    two = plan_memory(params="7B", dtype="fp16", tensor_parallel=2)
    assert two["weights_gb"] == pytest.approx(one["weights_gb"] / 2)
    assert two["kv_bytes_per_token"] * 2 == one["kv_bytes_per_token"]
    assert two["weights_gb_total"] == one["weights_gb_total"]
    assert two["max_sequences"] == 15  # (24 - 7) GB / 1.074 GB per device
    assert "--tensor-parallel-size 2" in two["vllm_command"]


def test_memory_overhead_is_subtracted():
    plan = plan_memory(params="7B", dtype="fp16", overhead=0.1)
    assert plan["free_gb_for_kv"] == pytest.approx(7.6)
    assert plan["max_sequences"] == 3
    assert "--gpu-memory-utilization 0.90" in plan["vllm_command"]


def test_memory_quantized_dtypes_need_a_quantized_checkpoint():
    plan = plan_memory(params="7B", dtype="int4")
    assert plan["weights_gb"] == pytest.approx(3.5)
    assert plan["kv_bytes_per_token"] == 524_288  # KV stays 16-bit
    assert "--quantization awq" in plan["vllm_command"]
    assert "quantized checkpoint" in plan["vllm_note"]


def test_memory_bundled_model(capsys):
    plan = cli_json(["plan", "memory", "--model", "bundled", "--dtype", "bf16"], capsys)
    assert (plan["layers"], plan["kv_heads"], plan["head_dim"]) == (30, 3, 64)
    assert plan["kv_bytes_per_token"] == 23_040  # 2 x 30 x 3 x 64 x 2
    assert plan["params"] == pytest.approx(134.5e6, rel=1e-3)
    assert "--dtype bfloat16" in plan["vllm_command"]


def test_count_params_counts_an_untied_head():
    from lmstack.model.weights import ModelConfig

    common = dict(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2)
    common |= dict(num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    common |= dict(max_position_embeddings=64)
    tied = count_params(ModelConfig(**common, tie_word_embeddings=True))
    untied = count_params(ModelConfig(**common, tie_word_embeddings=False))
    # per layer: q 8x8 + k,v 8x4 each + o 8x8 + MLP 3x8x16 + 2 norms x 8 = 592
    assert tied == 800 + 2 * 592 + 8
    assert untied == tied + 800


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--params", "-7e9"], "--params must be greater than 0"),
        (["--params", "seven"], "--params 'seven' is not a number"),
        (["--params", "7B", "--gpu-gb", "-24"], "--gpu-gb must be greater than 0, got -24"),
        (["--params", "7B", "--context", "0"], "--context must be greater than 0"),
        (["--params", "7B", "--dtype", "fp8"], "--dtype 'fp8' is not one of fp32"),
        (["--params", "7B", "--tensor-parallel", "0"], "--tensor-parallel must be 1 or more"),
        (["--params", "7B", "--kv-heads", "8", "--tensor-parallel", "3"], "divide the 8 KV"),
        (["--params", "7B", "--overhead", "1.5"], "--overhead is a fraction"),
        ([], "give --params"),
        (["--model", "bundled", "--params", "7B"], "either --model or --params"),
        (["--model", "/no/such/dir"], "no config.json"),
        (["--model", "bundled", "--context", "9000"], "max_position_embeddings of 8192"),
    ],
)
def test_memory_bad_input(args, message, capsys):
    code, out, err = run_cli(["plan", "memory", *args], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and out == ""
