"""The collection plan: splits, four responses per prompt, comparisons, rater assignments.

`plan` splits prompts into reward-train / reward-validation / policy-evaluation (stratified
by a field when given), has the engine answer each reward prompt four times (A: T=0.3,
B: T=0.7, C: T=1.0, D: T=0.7 with another seed), plans (A,B), (A,C), (B,D) per prompt with
a random side for each reply, adds 10% of them again with the sides flipped (consistency)
and 5% gold comparisons whose answer is known (a reply to this prompt against a reply to
another prompt), and assigns each comparison to two raters; a repeat goes to the same two
raters as its original, since consistency is a property of one rater. The store assigns a
third rater when the two disagree. `export_pairs` turns resolved ratings into pairs.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.align.data import Pair, PromptItem, atomic_write, write_pairs
from lmstack.align.ratings import Comparison, RatingStore
from lmstack.errors import InputError

SPLITS = ("reward_train", "reward_validation", "policy_eval")
# (label, temperature, seed offset): four samples with different spread
RESPONSE_SETTINGS = [("A", 0.3, 0), ("B", 0.7, 0), ("C", 1.0, 0), ("D", 0.7, 1)]
COMPARED = [("A", "B"), ("A", "C"), ("B", "D")]


@dataclass
class PlanConfig:
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    stratify_by: str | None = None
    repeat_fraction: float = 0.10
    gold_fraction: float = 0.05
    raters: list[str] = field(default_factory=lambda: ["rater1", "rater2", "rater3"])
    max_tokens: int = 192
    seed: int = 0


def split_prompts(
    prompts: list[PromptItem], fractions, stratify_by: str | None, seed: int
) -> dict[str, list[PromptItem]]:
    """Each stratum split by `fractions` (largest remainder), so every split sees every group."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise InputError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    groups: dict[str, list[PromptItem]] = defaultdict(list)
    for item in prompts:
        if stratify_by is not None and stratify_by not in item.fields:
            raise InputError(f"prompt {item.id!r} has no field {stratify_by!r} to stratify by")
        groups[str(item.fields.get(stratify_by, "")) if stratify_by else ""].append(item)
    rng = random.Random(seed)
    out: dict[str, list[PromptItem]] = {s: [] for s in SPLITS}
    for key in sorted(groups):
        items = groups[key][:]
        rng.shuffle(items)
        exact = [f * len(items) for f in fractions]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in by_remainder[: len(items) - sum(counts)]:
            counts[i] += 1
        start = 0
        for split, n in zip(SPLITS, counts):
            out[split] += items[start : start + n]
            start += n
    return out


def generate_responses(generator, prompts: list[PromptItem], config: PlanConfig, progress=None):
    """{prompt id: {label: text}} with the four settings, all in one continuous batch."""
    from lmstack.llm import ChatRequest

    requests, keys = [], []
    for item in prompts:
        for label, temperature, seed_offset in RESPONSE_SETTINGS:
            seed = config.seed * 1000 + seed_offset
            requests.append(
                ChatRequest(item.messages, config.max_tokens, temperature=temperature, seed=seed)
            )
            keys.append((item.id, label))
    done = [0]

    def on_done(i, completion):
        done[0] += 1
        if progress:
            progress(done[0], len(requests))

    results = generator.complete_many(requests, on_done=on_done)
    responses: dict[str, dict[str, str]] = defaultdict(dict)
    for (pid, label), completion in zip(keys, results):
        if completion.error:
            raise InputError(f"generation for prompt {pid!r} failed: {completion.error}")
        responses[pid][label] = completion.text.strip()
    return dict(responses)


def plan_comparisons(
    splits: dict[str, list[PromptItem]], responses: dict, config: PlanConfig
) -> list[Comparison]:
    rng = random.Random(config.seed + 1)
    main: list[Comparison] = []
    for split in ("reward_train", "reward_validation"):
        for item in splits[split]:
            replies = responses[item.id]
            for x, y in COMPARED:
                if rng.random() < 0.5:  # a random side, so position bias averages out
                    x, y = y, x
                main.append(
                    Comparison(
                        id=f"{item.id}:{x}{y}",
                        prompt_id=item.id,
                        split=split,
                        messages=item.messages,
                        a_text=replies[x],
                        b_text=replies[y],
                        a_label=x,
                        b_label=y,
                        kind="main",
                    )
                )
    if not main:
        raise InputError("no prompts fell into the reward splits; give more prompts")
    n_repeat = round(config.repeat_fraction * len(main))
    repeats = [
        Comparison(
            id=f"{c.id}:repeat",
            prompt_id=c.prompt_id,
            split=c.split,
            messages=c.messages,
            a_text=c.b_text,
            b_text=c.a_text,
            a_label=c.b_label,
            b_label=c.a_label,
            kind="repeat",
            repeat_of=c.id,
        )
        for c in rng.sample(main, n_repeat)
    ]
    gold = []
    reward_items = splits["reward_train"] + splits["reward_validation"]
    n_gold = round(config.gold_fraction * len(main)) if len(reward_items) > 1 else 0
    for i, item in enumerate(rng.sample(reward_items, min(n_gold, len(reward_items)))):
        other = rng.choice([it for it in reward_items if it.id != item.id])
        good, off_topic = responses[item.id]["A"], responses[other.id]["A"]
        if good == off_topic:
            continue
        good_first = rng.random() < 0.5
        gold.append(
            Comparison(
                id=f"gold{i + 1}:{item.id}",
                prompt_id=item.id,
                split="gold",
                messages=item.messages,
                a_text=good if good_first else off_topic,
                b_text=off_topic if good_first else good,
                a_label="A" if good_first else f"{other.id}:A",
                b_label=f"{other.id}:A" if good_first else "A",
                kind="gold",
                gold="A" if good_first else "B",
            )
        )
    # Interleave so repeats and gold are not recognisable by where they sit in the queue.
    ordered = main + gold
    rng.shuffle(ordered)
    for rep in repeats:
        ordered.insert(rng.randint(len(ordered) // 2, len(ordered)), rep)
    return ordered


def assign_raters(comparisons: list[Comparison], raters: list[str]) -> list[tuple[str, str, str]]:
    """Two primary raters per comparison, round robin; a repeat gets its original's raters."""
    if len(raters) < 2:
        raise InputError(f"need at least 2 raters (3 for tie-breaks), got {len(raters)}")
    rows, pair_of = [], {}
    turn = 0
    for c in comparisons:
        if c.kind == "repeat":
            continue
        pair = (raters[turn % len(raters)], raters[(turn + 1) % len(raters)])
        turn += 1
        pair_of[c.id] = pair
        rows += [(c.id, r, "primary") for r in pair]
    for c in comparisons:
        if c.kind == "repeat":
            rows += [(c.id, r, "primary") for r in pair_of[c.repeat_of]]
    return rows


def plan(
    prompts: list[PromptItem], out_dir: Path, generator, config: PlanConfig, progress=None
) -> dict:
    """Write out_dir/{plan.json, ratings.db, raters.json, policy_eval.jsonl}; return a summary."""
    if not prompts:
        raise InputError("the prompt set is empty")
    out_dir = Path(out_dir)
    db_path = out_dir / "ratings.db"
    if db_path.exists():
        raise InputError(f"{db_path} exists; plan into a new --out directory")
    splits = split_prompts(prompts, config.fractions, config.stratify_by, config.seed)
    reward_items = splits["reward_train"] + splits["reward_validation"]
    responses = generate_responses(generator, reward_items, config, progress)
    comparisons = plan_comparisons(splits, responses, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = RatingStore(db_path, create=True)
    tokens = {name: store.add_rater(name) for name in config.raters}
    tokens["admin"] = store.add_rater("admin", kind="admin")
    store.add_comparisons(comparisons)
    store.assign(assign_raters(comparisons, config.raters))
    store.close()
    tokens_path = out_dir / "raters.json"
    atomic_write(tokens_path, json.dumps(tokens, indent=2) + "\n")
    tokens_path.chmod(0o600)
    for split in SPLITS:
        rows = [
            json.dumps({"id": it.id, "prompt": it.messages, **it.fields}, ensure_ascii=False)
            for it in splits[split]
        ]
        atomic_write(out_dir / f"{split}.jsonl", "\n".join(rows) + ("\n" if rows else ""))
    kinds = defaultdict(int)
    for c in comparisons:
        kinds[c.kind] += 1
    summary = {
        "splits": {s: len(v) for s, v in splits.items()},
        "responses": 4 * len(reward_items),
        "comparisons": dict(kinds),
        "raters": config.raters,
        "ratings_db": str(db_path),
        "tokens": str(tokens_path),
        "settings": [
            {"label": lbl, "temperature": t, "seed": config.seed * 1000 + s}
            for lbl, t, s in RESPONSE_SETTINGS
        ],
    }
    atomic_write(out_dir / "plan.json", json.dumps({**summary, "responses_by_prompt": responses}))
    return summary


def resolve(choices: list[str]) -> str | None:
    """The majority choice of a comparison's ratings, or None when there is none."""
    counts: dict[str, int] = defaultdict(int)
    for c in choices:
        counts[c] += 1
    best = max(counts.values(), default=0)
    winners = [c for c, n in counts.items() if n == best]
    return winners[0] if len(winners) == 1 and best * 2 > len(choices) else None


def export_pairs(store: RatingStore, out_dir: Path, source: str = "human") -> dict:
    """Resolved main comparisons as pairs: out_dir/pairs_{reward_train,reward_validation}.jsonl.

    `source` is human, ai or all. Ties, "neither" and unresolved disagreements are left out.
    """
    if source not in ("human", "ai", "all"):
        raise InputError(f"--source must be human, ai or all, got {source!r}")
    by_comparison: dict[str, list[str]] = defaultdict(list)
    for r in store.all_ratings():
        if r["kind"] == "admin" or (source != "all" and r["kind"] != source):
            continue
        by_comparison[r["comparison_id"]].append(r["choice"])
    pairs: dict[str, list[Pair]] = {"reward_train": [], "reward_validation": []}
    counts = defaultdict(int)
    for c in store.comparisons("main"):
        verdict = resolve(by_comparison.get(c.id, []))
        counts[verdict or "unresolved"] += 1
        if verdict in ("A", "B"):
            chosen, rejected = (c.a_text, c.b_text) if verdict == "A" else (c.b_text, c.a_text)
            if chosen.strip() != rejected.strip():
                pairs[c.split].append(Pair(c.messages, chosen, rejected, c.id))
    out_dir = Path(out_dir)
    for split, items in pairs.items():
        if items:
            write_pairs(items, out_dir / f"pairs_{split}.jsonl")
    return {"pairs": {s: len(v) for s, v in pairs.items()}, "verdicts": dict(counts)}
