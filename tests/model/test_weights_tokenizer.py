"""Weights conversion/caching, HF directory loading, tokenizer and chat template, and the
one-line errors of `lmstack generate` on bad input."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from helpers import run_cli

from lmstack.errors import ModelLoadError
from lmstack.model.cache import NoCache
from lmstack.model.llama import LlamaForCausalLM
from lmstack.model.tokenizer import Tokenizer
from lmstack.model.weights import check_hf_dir, resolve_model


def test_bundled_model_is_cached_as_hf_directory(model):
    net, _ = model
    directory = resolve_model("bundled")
    assert directory == net.source
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file(), name
    config = check_hf_dir(directory)
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (3, 64, 49152)
    assert config.tie_word_embeddings


def test_warm_start_is_fast(model):
    start = time.perf_counter()
    net = LlamaForCausalLM.from_pretrained("bundled")
    Tokenizer(net.source)
    assert time.perf_counter() - start < 3.0


def test_loads_a_copied_hf_directory(model, tmp_path):
    """A trained checkpoint is served from its directory: same weights, same logits."""
    net, tok = model
    for f in net.source.iterdir():
        shutil.copy(f, tmp_path / f.name)
    other = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = tok.encode("Hello there")
    x, pos = torch.tensor(ids), torch.arange(len(ids))
    assert torch.equal(
        other.compute_logits(other(x, pos, NoCache())), net.compute_logits(net(x, pos, NoCache()))
    )


def test_directory_that_is_not_a_llama_model(tmp_path, model):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(tmp_path)
    net, _ = model
    for f in net.source.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="'bert' is not a Llama-family"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_corrupt_model_files(tmp_path, model, capsys):
    net, _ = model
    for f in net.source.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="corrupt or unreadable safetensors"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    code, _, err = run_cli(["generate", "hi", "--model", str(bad_gguf)], capsys)
    assert code == 2 and "not a readable GGUF" in err and err.count("\n") == 1
    code, _, err = run_cli(["generate", "hi", "--model", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def test_tokenizer_round_trip_and_special_tokens(model):
    _, tok = model
    text = "Hello, world! Ünïcödé and emoji 🚀 and 12345."
    assert tok.decode(tok.encode(text)) == text
    assert tok.id_to_token(tok.eos_token_id) == "<|im_end|>"
    assert {0, 2} <= tok.stop_token_ids
    assert tok.encode("<|im_start|>user")[0] == tok.bos_token_id == 1


def test_chat_template_is_the_models_own(model):
    _, tok = model
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
    )
    assert custom == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_stream_decoder_never_splits_characters(model):
    _, tok = model
    text = "naïve café — 東京 🚀🚀 done. " * 5
    ids = tok.encode(text)
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_cli_greedy_is_deterministic(model, capsys):
    args = ["generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0"]
    code, first, _ = run_cli(args, capsys)
    assert code == 0 and "Paris" in first
    _, second, _ = run_cli(args, capsys)
    assert first == second


def test_generate_cli_rejects_prompt_beyond_context(model, capsys):
    code, _, err = run_cli(["generate", " ".join(["word"] * 9000), "--max-tokens", "4"], capsys)
    assert code == 2
    assert "9000 tokens" in err and "8192" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--max-tokens", "0"], "max_tokens must be >= 1, got 0"),
        (["--dtype", "int3"], "dtype 'int3' is not supported"),
    ],
)
def test_generate_cli_rejects_bad_parameters(args, message, capsys, model):
    code, _, err = run_cli(["generate", "hello", *args], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_chat_streams_replies_and_keeps_the_conversation(model, tmp_path):
    import os
    import subprocess
    import sys

    script = "Say hello in one word.\nNow say goodbye in one word.\n/reset\n/quit\n"
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "chat", "--temperature", "0", "--max-tokens", "16"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    # Piped stdin: the "you> " prompts share lines with the replies.
    replies = [part.split("\n")[0] for part in proc.stdout.split("assistant> ")[1:]]
    assert len(replies) == 2 and all(r.strip() for r in replies)
    assert proc.stdout.count("you> ") == 4
