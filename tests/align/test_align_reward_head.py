"""The frozen-features reward model on the real bundled model: depth and L2 chosen by
cross-validation on the training pairs, and the saved, cut-down model scores exactly what
the fitted head promised."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

pytestmark = pytest.mark.slow

GOOD = [
    "Thanks for asking! Here is a clear, friendly answer with the steps you need.",
    "Happy to help: first check the settings page, then restart the app.",
    "Good question. The short answer is yes, and I can explain why if useful.",
    "Of course! Your invoice is under Billing, and I have emailed you a copy.",
]
BAD = ["no", "whatever", "idk lol", "not my problem"]


def write_pairs(path, n: int) -> None:
    rows = [
        {"prompt": f"Customer question number {i}?", "chosen": GOOD[i % 4], "rejected": BAD[i % 4]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_head_is_chosen_by_cross_validation_and_the_saved_model_agrees(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 12)
    out = tmp_path / "rm"
    code, stdout, err = run_cli(
        ["align", "reward", "train", "--pairs", str(pairs), "--out", str(out)]
        + ["--method", "head", "--depths", "2,30", "--l2", "1,100", "--folds", "3"]
        + ["--max-length", "64", "--val-fraction", "0.25", "--json"],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert {(r["depth"], r["l2"]) for r in report["cv_table"]} == {
        (2, 1.0),
        (2, 100.0),
        (30, 1.0),
        (30, 100.0),
    }
    assert report["depth"] == report["cv_table"][0]["depth"]
    assert report["train_pairs"] == 9 and report["val_pairs"] == 3
    # Polite full answers against curt ones: a linear head separates them.
    assert report["train_accuracy"] == 1.0 and report["val_accuracy"] == 1.0
    assert report["baseline_length"]["rule"] == "longer reply wins"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == report["depth"]
    # The saved directory, cut after the chosen block, scores every pair the same way.
    code, stdout, err = run_cli(
        ["align", "reward", "eval", "--model", str(out), "--pairs", str(pairs), "--json"], capsys
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result["accuracy"] == 1.0 and result["pairs"] == 12 and result["max_length"] == 64


def test_head_method_refuses_bad_settings_by_name(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 12)
    base = ["align", "reward", "train", "--pairs", str(pairs), "--out", str(tmp_path / "rm")]
    code, _, err = run_cli(base + ["--method", "magic"], capsys)
    assert code == 2 and "--method must be trl or head, got 'magic'" in err
    code, _, err = run_cli(base + ["--method", "head", "--depths", "2,99"], capsys)
    assert code == 2 and "--depths must be in [1, 30], got [99]" in err
    code, _, err = run_cli(base + ["--method", "head", "--l2", "1,x"], capsys)
    assert code == 2 and "--l2 takes comma-separated numbers, got '1,x'" in err
    assert not (tmp_path / "rm").exists()
