"""Win-rate evaluation of two policies on held-out prompts.

Both models answer every prompt through `lmstack.llm` (the serving engine, greedy by
default). A judge compares each pair of answers: `reward` (a reward model: the higher score
wins, within `tie_margin` a tie) or `file` (blind sheets for human raters: the two answers
in random order as "Response 1/2", the key kept apart; `lmstack align eval-score` unblinds
the filled sheets). Reported: wins/losses/ties for A, the two-sided sign test p-value on
the non-tied prompts, distinct-1/2 per model and answer-length statistics.
"""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from lmstack.align.data import PromptItem, atomic_write
from lmstack.errors import InputError

SHEET_CHOICES = {"1", "2", "tie"}


@dataclass
class EvalConfig:
    max_tokens: int = 128
    temperature: float = 0.0
    tie_margin: float = 0.0
    seed: int = 0


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of wins vs losses under p = 0.5; ties dropped."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over a model's answers (whitespace tokens)."""
    grams, total = set(), 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i : i + n]))
            total += 1
    return round(len(grams) / total, 4) if total else 0.0


def length_stats(texts: list[str]) -> dict:
    words = [len(t.split()) for t in texts]
    return {
        "mean_words": round(statistics.fmean(words), 2) if words else 0.0,
        "median_words": statistics.median(words) if words else 0,
        "max_words": max(words, default=0),
    }


def generate_answers(model: str, items: list[PromptItem], config: EvalConfig) -> list[str]:
    from lmstack.llm import ChatRequest, make_generator

    generator = make_generator(model=None if model == "bundled" else model)
    try:
        requests = [
            ChatRequest(it.messages, config.max_tokens, config.temperature, seed=config.seed)
            for it in items
        ]
        results = generator.complete_many(requests)
    finally:
        close = getattr(generator, "close", None)
        if close:
            close()
    failed = [r.error for r in results if r.error]
    if failed:
        raise InputError(f"{model}: {len(failed)} generations failed, first: {failed[0]}")
    return [r.text.strip() for r in results]


def summarise(outcomes: list[str], answers_a, answers_b, extra: dict | None = None) -> dict:
    wins, losses, ties = (outcomes.count(x) for x in ("win", "loss", "tie"))
    decided = wins + losses
    return {
        "prompts": len(outcomes),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": round(wins / decided, 4) if decided else None,
        "win_rate_with_half_ties": round((wins + 0.5 * ties) / len(outcomes), 4)
        if outcomes
        else None,
        "sign_test_p": round(sign_test_p(wins, losses), 6),
        "distinct": {
            "a": {"distinct_1": distinct_n(answers_a, 1), "distinct_2": distinct_n(answers_a, 2)},
            "b": {"distinct_1": distinct_n(answers_b, 1), "distinct_2": distinct_n(answers_b, 2)},
        },
        "length": {"a": length_stats(answers_a), "b": length_stats(answers_b)},
        **(extra or {}),
    }


def run_eval(a, b, items, judge, reward_dir=None, sheets_dir=None, config=None) -> dict:
    config = config or EvalConfig()
    if not items:
        raise InputError("the prompt set is empty")
    if judge == "reward":
        from lmstack.align.reward import RewardModel, check_reward_dir

        check_reward_dir(Path(reward_dir))  # before minutes of generation, not after
    answers_a = generate_answers(a, items, config)
    answers_b = generate_answers(b, items, config)
    if judge == "reward":
        rm = RewardModel(reward_dir)
        messages = [it.messages for it in items]
        score_a, score_b = rm.score(messages, answers_a), rm.score(messages, answers_b)
        outcomes = [
            "tie" if abs(x - y) <= config.tie_margin else ("win" if x > y else "loss")
            for x, y in zip(score_a, score_b)
        ]
        return summarise(
            outcomes,
            answers_a,
            answers_b,
            {
                "judge": "reward",
                "a": a,
                "b": b,
                "mean_reward": {
                    "a": round(statistics.fmean(score_a), 4),
                    "b": round(statistics.fmean(score_b), 4),
                },
            },
        )
    return write_sheets(a, b, items, answers_a, answers_b, Path(sheets_dir), config.seed)


def write_sheets(a, b, items, answers_a, answers_b, sheets_dir: Path, seed: int) -> dict:
    """sheet.csv for raters (id, prompt, response_1, response_2, preference) + key.json."""
    rng = random.Random(seed)
    rows, key = [], {}
    for item, x, y in zip(items, answers_a, answers_b):
        a_first = rng.random() < 0.5
        key[item.id] = "a" if a_first else "b"  # which model is Response 1
        rows.append(
            {
                "id": item.id,
                "prompt": item.text,
                "response_1": x if a_first else y,
                "response_2": y if a_first else x,
                "preference": "",
            }
        )
    sheets_dir.mkdir(parents=True, exist_ok=True)
    with (sheets_dir / "sheet.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    answers = {it.id: {"a": x, "b": y} for it, x, y in zip(items, answers_a, answers_b)}
    atomic_write(
        sheets_dir / "key.json", json.dumps({"a": a, "b": b, "first": key, "answers": answers})
    )
    return {
        "judge": "file",
        "sheet": str(sheets_dir / "sheet.csv"),
        "prompts": len(rows),
        "instructions": "fill 'preference' with 1, 2 or tie; then run "
        f"`lmstack align eval-score --sheets {sheets_dir}`",
    }


def score_sheets(sheets_dir: Path) -> dict:
    """Unblind filled sheets (every sheet*.csv in the directory, e.g. one per rater)."""
    sheets_dir = Path(sheets_dir)
    key_file = sheets_dir / "key.json"
    if not key_file.is_file():
        raise InputError(f"{sheets_dir} has no key.json (written by `align eval --judge file`)")
    key = json.loads(key_file.read_text())
    outcomes, answers_a, answers_b, problems = [], [], [], []
    for sheet in sorted(sheets_dir.glob("sheet*.csv")):
        with sheet.open(newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), 2):
                pid, choice = row.get("id"), (row.get("preference") or "").strip().lower()
                if pid not in key["first"]:
                    problems.append(f"{sheet.name}:{line}: unknown id {pid!r}")
                    continue
                if choice not in SHEET_CHOICES:
                    problems.append(f"{sheet.name}:{line}: preference {choice!r} not 1, 2 or tie")
                    continue
                if choice == "tie":
                    outcomes.append("tie")
                else:
                    first_is_a = key["first"][pid] == "a"
                    outcomes.append("win" if (choice == "1") == first_is_a else "loss")
                answers_a.append(key["answers"][pid]["a"])
                answers_b.append(key["answers"][pid]["b"])
    if not outcomes:
        raise InputError(
            f"no scored rows in {sheets_dir}/sheet*.csv" + (f": {problems[0]}" if problems else "")
        )
    return summarise(
        outcomes,
        answers_a,
        answers_b,
        {"judge": "file", "a": key["a"], "b": key["b"], "skipped_rows": problems},
    )


def format_result(result: dict) -> str:
    if "wins" not in result:
        return f"blind sheet: {result['sheet']} ({result['prompts']} prompts)\n" + result.get(
            "instructions", ""
        )
    lines = [
        f"A={result['a']} vs B={result['b']} "
        f"({result['judge']} judge, {result['prompts']} prompts)",
        f"A wins {result['wins']}, loses {result['losses']}, ties {result['ties']}; "
        f"win rate {result['win_rate']}; sign test p = {result['sign_test_p']:.4g}",
    ]
    for side in ("a", "b"):
        d, n = result["distinct"][side], result["length"][side]
        lines.append(
            f"{side.upper()}: distinct-1 {d['distinct_1']}, distinct-2 {d['distinct_2']}, "
            f"mean {n['mean_words']} words (median {n['median_words']})"
        )
    if "mean_reward" in result:
        lines.append(f"mean reward: A {result['mean_reward']['a']}, B {result['mean_reward']['b']}")
    return "\n".join(lines)
