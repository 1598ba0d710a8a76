"""PPO's controls on the real bundled model: the hard KL stop undoes the update that
crossed it, and bad settings are refused before anything loads."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow

PROMPTS = ["Say hello.", "Name a colour.", "Count to three.", "What is tea?"]


@pytest.fixture(scope="module")
def untrained_reward(tmp_path_factory):
    """A real reward-model directory: the bundled model with a fresh scalar head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmstack.align.reward import load_tokenizer, save_reward_model
    from lmstack.model.weights import resolve_model

    base = resolve_model(None)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    out = tmp_path_factory.mktemp("rm")
    save_reward_model(model, load_tokenizer(base), out, base)
    return out


def test_hard_kl_stop_undoes_the_update_that_crossed_it(tmp_path, untrained_reward, capsys):
    from safetensors.torch import load_file

    from lmstack.model.weights import resolve_model

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "ppo"
    # A learning rate 1000x too high: the first update moves the policy far from the
    # reference, and the next rollout's KL is far above a stop of 0.5 nats.
    code, stdout, err = run_cli(
        ["align", "ppo", "--reward", str(untrained_reward), "--prompts", str(prompts)]
        + ["--out", str(out), "--steps", "3", "--batch-size", "2", "--mini-batch-size", "2"]
        + ["--max-new-tokens", "8", "--train-layers", "1", "--lr", "1e-2"]
        + ["--kl-target", "0.2", "--kl-stop", "0.5", "--json"],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["stopped"] and "after update 1; that update was undone" in report["stopped"]
    assert report["steps_run"] == 1 and report["updates_kept"] == 0
    assert "hard KL stop" in err
    # The saved policy is the one measured under the limit: the untouched SFT weights.
    saved = load_file(str(out / "model.safetensors"))
    base = load_file(str(resolve_model(None) / "model.safetensors"))
    top = [k for k in saved if k.startswith("model.layers.29.")]
    assert top and all(saved[k].equal(base[k].to(saved[k].dtype)) for k in top)
    assert set(report["timings"]) >= {"load_s", "rollout_s", "score_s", "forward_s", "update_s"}


def test_ppo_refuses_a_floor_above_the_starting_beta(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    code, _, err = run_cli(
        ["align", "ppo", "--reward", str(tmp_path), "--prompts", str(prompts)]
        + ["--out", str(tmp_path / "out"), "--beta", "0.05", "--beta-min", "0.1"],
        capsys,
    )
    assert code == 2 and "--beta-min must be in [0, --beta=0.05], got 0.1" in err
    assert not (tmp_path / "out").exists()
