"""Alignment without a model: importing preference files, the rating store, QC arithmetic,
the sign test, diversity and the adaptive KL rule. Bad input gets a clear error and leaves
what is stored untouched."""

from __future__ import annotations

import json
import sqlite3

import pytest
from helpers import run_cli

from lmstack.align.collect import PlanConfig, assign_raters, plan_comparisons, split_prompts
from lmstack.align.data import PromptItem, load_pairs, load_prompts, parse_hh
from lmstack.align.evaluate import distinct_n, sign_test_p
from lmstack.align.ppo_math import adapt_beta, gae, pearson
from lmstack.align.qc import cohen_kappa, qc_report
from lmstack.align.ratings import AuthError, Comparison, NotFoundError, RatingStore
from lmstack.align.reward import check_reward_dir, wilson_interval
from lmstack.config import data_dir
from lmstack.errors import InputError, ModelLoadError

HH_CHOSEN = (
    "\n\nHuman: My order is late.\n\nAssistant: Sorry to hear that. What is the order number?"
    "\n\nHuman: 1234\n\nAssistant: Thanks, it ships tomorrow."
)
HH_REJECTED = HH_CHOSEN.replace("Thanks, it ships tomorrow.", "ok")


def test_shared_sharegpt_file_imports_all_300_pairs():
    pairs, report = load_pairs(data_dir() / "preferences" / "dpo_en_demo.json")
    assert len(pairs) == 300 and report.kept == 300 and not report.skipped
    assert pairs[0].prompt[-1]["role"] == "user"
    assert pairs[0].chosen.startswith("That sounds like a fun")
    assert all(p.chosen != p.rejected for p in pairs)


def test_anthropic_hh_prompt_is_everything_before_the_last_assistant_turn():
    messages, reply = parse_hh(HH_CHOSEN)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "1234"
    assert reply == "Thanks, it ships tomorrow."


def test_malformed_lines_are_reported_by_number_skipped_and_counted(tmp_path, capsys):
    lines = [
        json.dumps({"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}),
        "{not json",
        json.dumps({"prompt": "Say hi", "chosen": "Same", "rejected": "Same"}),
        json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}),
        json.dumps({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}),
        json.dumps(["not", "an", "object"]),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, report = load_pairs(path)
    assert len(pairs) == 2 and report.kept == 2
    where = dict(report.skipped)
    assert set(where) == {"pairs.jsonl:2", "pairs.jsonl:3", "pairs.jsonl:4", "pairs.jsonl:6"}
    assert "not valid JSON" in where["pairs.jsonl:2"]
    assert "identical" in where["pairs.jsonl:3"]
    assert "empty" in where["pairs.jsonl:4"]

    out = tmp_path / "out.jsonl"
    code, stdout, stderr = run_cli(
        ["align", "collect", "import", str(path), "--out", str(out)], capsys
    )
    assert code == 0 and "2 pairs" in stdout
    assert "4 skipped" in stderr and "pairs.jsonl:3: chosen and rejected are identical" in stderr
    assert len(out.read_text().splitlines()) == 2


def test_a_file_with_no_valid_pair_and_an_empty_prompt_set_are_errors(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(InputError, match="no valid preference pairs"):
        load_pairs(path)
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="prompt set is empty"):
        load_prompts(empty)
    out = tmp_path / "plan"
    code, _, err = run_cli(
        ["align", "collect", "plan", "--prompts", str(empty), "--out", str(out)], capsys
    )
    assert code == 2 and "prompt set is empty" in err and not out.exists()


def test_stratified_split_puts_every_group_in_every_split():
    prompts = [
        PromptItem(f"p{i}", [{"role": "user", "content": f"q{i}"}], {"topic": t})
        for i, t in enumerate(["billing"] * 10 + ["tech"] * 10)
    ]
    splits = split_prompts(prompts, (0.6, 0.2, 0.2), "topic", seed=1)
    assert {k: len(v) for k, v in splits.items()} == {
        "reward_train": 12,
        "reward_validation": 4,
        "policy_eval": 4,
    }
    for items in splits.values():
        assert {it.fields["topic"] for it in items} == {"billing", "tech"}
    with pytest.raises(InputError, match="no field 'lang'"):
        split_prompts(prompts, (0.6, 0.2, 0.2), "lang", seed=1)


def _planned(n_prompts=20):
    prompts = [
        PromptItem(f"p{i}", [{"role": "user", "content": f"q{i}"}]) for i in range(n_prompts)
    ]
    splits = {"reward_train": prompts, "reward_validation": [], "policy_eval": []}
    responses = {p.id: {lbl: f"{p.id} reply {lbl}" for lbl in "ABCD"} for p in prompts}
    comparisons = plan_comparisons(splits, responses, PlanConfig())
    return comparisons


def test_plan_has_three_comparisons_per_prompt_10pct_flipped_repeats_and_5pct_gold():
    comparisons = _planned(20)
    main = [c for c in comparisons if c.kind == "main"]
    repeats = [c for c in comparisons if c.kind == "repeat"]
    gold = [c for c in comparisons if c.kind == "gold"]
    assert len(main) == 60 and len(repeats) == 6 and len(gold) == 3
    pairs = {frozenset((c.a_label, c.b_label)) for c in main if c.prompt_id == "p0"}
    assert pairs == {frozenset("AB"), frozenset("AC"), frozenset("BD")}
    by_id = {c.id: c for c in comparisons}
    for r in repeats:
        original = by_id[r.repeat_of]
        assert (r.a_text, r.b_text) == (original.b_text, original.a_text)
    for g in gold:  # the known answer is this prompt's own reply, not the off-topic one
        good = g.a_text if g.gold == "A" else g.b_text
        assert good.startswith(g.prompt_id + " ")
    rows = assign_raters(comparisons, ["r1", "r2", "r3"])
    per = {}
    for cid, rater, _ in rows:
        per.setdefault(cid, []).append(rater)
    assert all(len(v) == 2 and len(set(v)) == 2 for v in per.values())
    for r in repeats:  # consistency is per rater: the same two raters see the repeat
        assert sorted(per[r.id]) == sorted(per[r.repeat_of])


@pytest.fixture
def store(tmp_path):
    store = RatingStore(tmp_path / "ratings.db", create=True)
    tokens = {n: store.add_rater(n) for n in ("r1", "r2", "r3")}
    base = dict(prompt_id="p", split="reward_train", messages=[{"role": "user", "content": "q"}])
    store.add_comparisons(
        [
            Comparison(
                id="c1", a_text="x", b_text="y", a_label="A", b_label="B", kind="main", **base
            ),
            Comparison(
                id="c2", a_text="y", b_text="z", a_label="B", b_label="D", kind="main", **base
            ),
            Comparison(
                id="c1:repeat",
                a_text="y",
                b_text="x",
                a_label="B",
                b_label="A",
                kind="repeat",
                repeat_of="c1",
                **base,
            ),
            Comparison(
                id="g1",
                a_text="good",
                b_text="off",
                a_label="A",
                b_label="o:A",
                kind="gold",
                gold="A",
                **base,
            ),
        ]
    )
    store.assign([(c, r, "primary") for c in ("c1", "c2", "c1:repeat", "g1") for r in ("r1", "r2")])
    store.tokens = tokens
    return store


def test_store_isolates_raters_and_refuses_bad_ratings_without_losing_any(store):
    assert store.rater_for_token(store.tokens["r1"]) == ("r1", "human")
    with pytest.raises(AuthError):
        store.rater_for_token("wrong-token")
    store.rate("r1", "c1", "A")
    with pytest.raises(NotFoundError, match="unknown comparison 'nope'"):
        store.rate("r1", "nope", "A")
    with pytest.raises(NotFoundError, match="not assigned to r3"):
        store.rate("r3", "c1", "B")
    with pytest.raises(InputError, match="choice must be one of"):
        store.rate("r1", "c1", "maybe")
    assert store.ratings_of("r1") == {"c1": "A"}
    assert store.ratings_of("r3") == {}
    raw = sqlite3.connect(store.path).execute("SELECT comparison_id, rater, choice FROM ratings")
    assert raw.fetchall() == [("c1", "r1", "A")]
    store.rate("r1", "c1", "B")  # a rater may change their own mind
    assert store.ratings_of("r1") == {"c1": "B"}


def test_disagreement_assigns_a_tiebreak_to_a_third_rater(store):
    store.rate("r1", "c2", "A")
    store.rate("r2", "c2", "B")
    assert store.pending_tiebreaks() == [{"comparison_id": "c2", "rater": "r3"}]
    assert store.next_for("r3").id == "c2"
    store.rate("r3", "c2", "A")
    assert store.pending_tiebreaks() == []


def test_qc_consistency_gold_kappa_and_flags(store):
    for rater, choices in {
        "r1": {"c1": "A", "c1:repeat": "B", "g1": "A", "c2": "B"},  # consistent, gold right
        "r2": {"c1": "A", "c1:repeat": "A", "g1": "B", "c2": "B"},  # flips, gold wrong
    }.items():
        for cid, choice in choices.items():
            store.rate(rater, cid, choice)
    report = qc_report(store)
    assert report["raters"]["r1"]["consistency"] == 1.0
    assert report["raters"]["r1"]["gold_accuracy"] == 1.0
    assert report["raters"]["r2"]["consistency"] == 0.0
    assert report["raters"]["r2"]["gold_accuracy"] == 0.0
    assert report["flagged"] == ["r2"]
    (pair,) = report["pairwise"]
    assert pair["shared"] == 4 and pair["agreement"] == 0.5
    assert pair["kappa"] == pytest.approx(cohen_kappa(["A", "B", "A", "B"], ["A", "A", "B", "B"]))


def test_cohen_kappa_matches_the_textbook_example():
    # 50 items: both yes 20, both no 15, 5 yes/no, 10 no/yes -> po 0.7, pe 0.5, kappa 0.4
    x = ["A"] * 20 + ["B"] * 15 + ["A"] * 5 + ["B"] * 10
    y = ["A"] * 20 + ["B"] * 15 + ["B"] * 5 + ["A"] * 10
    assert cohen_kappa(x, y) == pytest.approx(0.4)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None


def test_sign_test_wilson_distinct_and_pearson():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(9, 1) == pytest.approx(2 * 11 / 1024)
    assert sign_test_p(5, 5) == 1.0
    low, high = wilson_interval(40, 60)
    assert low == pytest.approx(0.5406, abs=1e-3) and high == pytest.approx(0.7727, abs=1e-3)
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3, abs=1e-4)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_adaptive_kl_rule_and_gae():
    import torch

    assert adapt_beta(0.1, 3.1, 2.0) == pytest.approx(0.15)
    assert adapt_beta(0.1, 1.3, 2.0) == pytest.approx(0.1 / 1.5)
    assert adapt_beta(0.1, 2.5, 2.0) == 0.1
    # The floor holds beta up through a long quiet start, and the climb starts from it.
    beta = 0.05
    for _ in range(20):
        beta = adapt_beta(beta, 0.0, 2.0, floor=0.01)
    assert beta == 0.01
    assert adapt_beta(beta, 3.5, 2.0, floor=0.01) == pytest.approx(0.015)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    adv, ret = gae(rewards * mask, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.0, 0.0, 0.0]]
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv[0, :2].tolist() == pytest.approx([0.5, 1.0])


def test_a_directory_that_is_not_a_reward_model_is_refused(tmp_path, capsys):
    from lmstack.model.weights import resolve_model

    with pytest.raises(ModelLoadError, match="no config.json"):
        check_reward_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="ForSequenceClassification"):
        check_reward_dir(resolve_model(None))  # a causal LM, not a reward model
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    code, _, err = run_cli(
        ["align", "reward", "eval", "--model", str(tmp_path), "--pairs", str(pairs), "--json"],
        capsys,
    )
    assert code == 2 and "is not a reward model directory" in err


def test_ppo_and_eval_refuse_a_reward_directory_that_is_not_one(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    code, _, err = run_cli(
        ["align", "ppo", "--reward", str(tmp_path), "--prompts", str(prompts)]
        + ["--out", str(tmp_path / "out")],
        capsys,
    )
    assert code == 2 and "is not a reward model directory" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(
        ["align", "eval", "--a", "bundled", "--b", "bundled", "--prompts", str(prompts)]
        + ["--judge", "reward", "--reward", str(tmp_path)],
        capsys,
    )
    assert code == 2 and "is not a reward model directory" in err
