"""The whole alignment pipeline at tiny scale on the real bundled model, through the CLI:
plan (4 responses per prompt from the engine) -> simulated ratings -> QC -> AI feedback ->
export -> reward model -> PPO -> the policy served by the engine -> evaluation with the
reward judge and with blind sheets. Plus DPO for a step.

Simulated raters, for this test only, follow one stated rubric: "prefer the reply with
fewer words (conciseness); equal word counts are a tie". It is deterministic, so a rater
who follows it is perfectly consistent on the flipped repeats.
"""

from __future__ import annotations

import csv
import json

import pytest
from helpers import run_cli

from lmstack.align.ratings import RatingStore

pytestmark = pytest.mark.slow

PROMPTS = [
    ("q1", "billing", "I was charged twice for my subscription. Can you help?"),
    ("q2", "billing", "How do I get a copy of last month's invoice?"),
    ("q3", "tech", "The app crashes when I open settings. What should I do?"),
    ("q4", "tech", "How do I reset my password?"),
    ("q5", "billing", "Can I switch to yearly billing?"),
    ("q6", "tech", "Why is sync so slow today?"),
]


def rubric(a: str, b: str) -> str:
    """The simulated raters' rubric: fewer words wins; a tie on equal counts."""
    na, nb = len(a.split()), len(b.split())
    return "tie" if na == nb else ("A" if na < nb else "B")


def test_pipeline_plan_rate_reward_ppo_serve_evaluate(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": i, "topic": topic, "prompt": text}) + "\n"
            for i, topic, text in PROMPTS
        )
    )
    plan_dir = tmp_path / "plan"
    code, out, err = run_cli(
        ["align", "collect", "plan", "--prompts", str(prompts), "--out", str(plan_dir)]
        + ["--max-tokens", "12", "--json"],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    n_reward = summary["splits"]["reward_train"] + summary["splits"]["reward_validation"]
    assert sum(summary["splits"].values()) == 6 and summary["splits"]["policy_eval"] >= 1
    assert summary["responses"] == 4 * n_reward
    assert summary["comparisons"]["main"] == 3 * n_reward
    tokens = json.loads((plan_dir / "raters.json").read_text())
    assert set(tokens) == {"rater1", "rater2", "rater3", "admin"}

    db = plan_dir / "ratings.db"
    store = RatingStore(db)
    for rater in ("rater1", "rater2", "rater3"):
        for cid in store.assigned(rater):
            c = store.comparison(cid)
            store.rate(rater, cid, rubric(c.a_text, c.b_text))
    store.close()

    code, out, err = run_cli(["align", "collect", "qc", "--db", str(db), "--json"], capsys)
    assert code == 0, err
    qc = json.loads(out)
    for info in qc["raters"].values():
        assert info["consistency"] in (None, 1.0)  # the rubric is deterministic
    assert qc["pending_tiebreaks"] == []  # all raters share the rubric: no disagreement

    principles = tmp_path / "principles.txt"
    principles.write_text("- prefer concise over verbose\n- match tone to context\n")
    code, out, err = run_cli(
        ["align", "collect", "rate-ai", "--db", str(db), "--principles", str(principles)]
        + ["--limit", "2", "--json"],
        capsys,
    )
    assert code == 0, err
    ai = json.loads(out)
    assert ai["rated"] + ai["failed"] == 2 and ai["rater"].startswith("ai:")
    code, out, _ = run_cli(["align", "collect", "qc", "--db", str(db), "--json"], capsys)
    (ai_row,) = json.loads(out)["ai_human"]
    assert ai_row["shared"] <= 2

    code, out, err = run_cli(
        ["align", "collect", "export", "--db", str(db), "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    exported = json.loads(out)["pairs"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            (tmp_path / f"pairs_{split}.jsonl").read_text()
            for split in ("reward_train", "reward_validation")
            if exported[split]
        )
    )
    assert sum(exported.values()) >= 2

    rm = tmp_path / "rm"
    code, out, err = run_cli(
        ["align", "reward", "train", "--pairs", str(pairs), "--out", str(rm)]
        + ["--val-fraction", "0.3", "--max-steps", "2", "--batch-size", "2"]
        + ["--max-length", "96", "--train-layers", "1", "--no-eval-before", "--json"],
        capsys,
    )
    assert code == 0, err
    trained = json.loads(out)
    assert 0.0 <= trained["val_accuracy"] <= 1.0 and trained["config"]["lr"] == 1e-5
    code, out, err = run_cli(
        ["align", "reward", "eval", "--model", str(rm), "--pairs", str(pairs), "--json"], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    assert (
        set(result) >= {"accuracy", "pairs"}
        and result["pairs"] == trained["train_pairs"] + (trained["val_pairs"])
    )
    code, out, _ = run_cli(
        ["align", "reward", "score", "--model", str(rm), "--prompt", "Hi", "--response", "Hello!"],
        capsys,
    )
    assert code == 0 and isinstance(json.loads(out)["score"], float)

    policy = tmp_path / "ppo"
    code, out, err = run_cli(
        ["align", "ppo", "--reward", str(rm), "--out", str(policy)]
        + ["--prompts", str(plan_dir / "reward_train.jsonl")]
        + ["--eval-prompts", str(plan_dir / "policy_eval.jsonl")]
        + ["--steps", "2", "--batch-size", "2", "--mini-batch-size", "1", "--ppo-epochs", "1"]
        + ["--max-new-tokens", "6", "--train-layers", "1", "--json"],
        capsys,
    )
    assert code == 0, err
    ppo = json.loads(out)
    assert ppo["steps_run"] == 2 and ppo["stopped"] is None
    log = [json.loads(line) for line in (policy / "ppo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for record in log:
        for key in ("reward_mean", "reward_std", "kl", "beta", "entropy", "response_length"):
            assert isinstance(record[key], float), key
        assert "reward_length_corr" in record and record["score_scale"] > 0
    assert log[0]["kl"] == pytest.approx(0.0, abs=0.05)  # the policy starts as the reference
    assert ppo["beta_trajectory"][1] == pytest.approx(0.05 / 1.5, rel=1e-3)  # KL < target/1.5
    assert (policy / "ppo_curves.png").stat().st_size > 10_000
    assert set(ppo["heldout"]) >= {"reward_before", "reward_after", "kl_after", "kl_target"}

    # The trained policy is a plain HF directory the serving engine loads.
    from lmstack.llm import ChatRequest, make_generator
    from lmstack.model.weights import check_hf_dir

    check_hf_dir(policy)
    generator = make_generator(model=str(policy))
    try:
        reply = generator.complete(
            ChatRequest([{"role": "user", "content": "Say hello."}], max_tokens=8)
        )
    finally:
        generator.close()
    assert reply.error is None and reply.completion_tokens > 0

    eval_prompts = str(plan_dir / "policy_eval.jsonl")
    code, out, err = run_cli(
        ["align", "eval", "--a", str(policy), "--b", "bundled", "--prompts", eval_prompts]
        + ["--judge", "reward", "--reward", str(rm), "--max-tokens", "8", "--json"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["wins"] + result["losses"] + result["ties"] == result["prompts"]
    assert 0.0 <= result["sign_test_p"] <= 1.0
    assert set(result["distinct"]["a"]) == {"distinct_1", "distinct_2"}

    sheets = tmp_path / "sheets"
    code, out, err = run_cli(
        ["align", "eval", "--a", str(policy), "--b", "bundled", "--prompts", eval_prompts]
        + ["--judge", "file", "--sheets", str(sheets), "--max-tokens", "8", "--json"],
        capsys,
    )
    assert code == 0, err
    rows = list(csv.DictReader((sheets / "sheet.csv").open()))
    assert rows and "a" not in rows[0] and set(rows[0]) >= {"response_1", "response_2"}
    for row in rows:
        row["preference"] = "1"  # the human prefers whichever model was shown first
    with (sheets / "sheet.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, out, err = run_cli(["align", "eval-score", "--sheets", str(sheets), "--json"], capsys)
    assert code == 0, err
    scored = json.loads(out)
    key = json.loads((sheets / "key.json").read_text())["first"]
    assert scored["wins"] == sum(v == "a" for v in key.values())
    assert scored["wins"] + scored["losses"] == len(rows)


def test_dpo_one_step_saves_a_servable_policy(tmp_path, capsys):
    from lmstack.model.weights import check_hf_dir

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
            for p, c, r in [
                ("Where is my parcel?", "It ships tomorrow; tracking follows.", "Wait."),
                ("Cancel my plan.", "Done: your plan ends on the 30th.", "Why?"),
            ]
        )
    )
    out = tmp_path / "dpo"
    code, stdout, err = run_cli(
        ["align", "dpo", "--pairs", str(pairs), "--out", str(out)]
        + ["--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--json"],
        capsys,
    )
    assert code == 0, err
    assert json.loads(stdout)["pairs"] == 2
    check_hf_dir(out)
