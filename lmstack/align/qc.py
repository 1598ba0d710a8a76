"""Rater quality control: consistency on repeats, gold accuracy, agreement, Cohen's kappa.

Consistency: a repeat shows a comparison again with the sides flipped; a consistent rater
gives the mirrored answer (A<->B, tie and neither unchanged). Gold accuracy: comparisons with
a known answer. Agreement and Cohen's kappa are computed for every pair of raters on the
comparisons both rated. A rater under `threshold` (90%) on consistency or gold accuracy is
flagged. AI raters are compared with the human majority where both rated a comparison.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

from lmstack.align.collect import resolve
from lmstack.align.ratings import CHOICES, RatingStore

FLIP = {"A": "B", "B": "A", "tie": "tie", "neither": "neither"}


def cohen_kappa(x: list[str], y: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items (None when undefined)."""
    n = len(x)
    if n == 0 or n != len(y):
        return None
    observed = sum(a == b for a, b in zip(x, y)) / n
    expected = sum((x.count(c) / n) * (y.count(c) / n) for c in CHOICES)
    if expected >= 1.0:
        return None  # both gave one label to everything: chance agreement is total
    return (observed - expected) / (1 - expected)


def _fraction(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def qc_report(store: RatingStore, threshold: float = 0.9) -> dict:
    comparisons = {c.id: c for c in store.comparisons()}
    kinds = store.rater_kinds()
    by_rater: dict[str, dict[str, str]] = defaultdict(dict)
    for r in store.all_ratings():
        if r["kind"] != "admin":
            by_rater[r["rater"]][r["comparison_id"]] = r["choice"]

    raters = {}
    for name in sorted(by_rater):
        mine = by_rater[name]
        consistent = repeats = gold_right = gold_total = 0
        for cid, choice in mine.items():
            c = comparisons[cid]
            if c.kind == "repeat" and c.repeat_of in mine:
                repeats += 1
                consistent += mine[c.repeat_of] == FLIP[choice]
            elif c.kind == "gold":
                gold_total += 1
                gold_right += choice == c.gold
        consistency, gold = _fraction(consistent, repeats), _fraction(gold_right, gold_total)
        reasons = [
            f"{what} {value:.0%} < {threshold:.0%}"
            for what, value in (("consistency", consistency), ("gold accuracy", gold))
            if value is not None and value < threshold
        ]
        raters[name] = {
            "kind": kinds.get(name, "human"),
            "ratings": len(mine),
            "repeats": repeats,
            "consistency": consistency,
            "gold": gold_total,
            "gold_accuracy": gold,
            "flagged": bool(reasons),
            "reasons": reasons,
        }

    pairs = []
    humans = [r for r in sorted(by_rater) if kinds.get(r) == "human"]
    for a, b in combinations(humans, 2):
        shared = sorted(set(by_rater[a]) & set(by_rater[b]))
        if not shared:
            continue
        x = [by_rater[a][c] for c in shared]
        y = [by_rater[b][c] for c in shared]
        kappa = cohen_kappa(x, y)
        pairs.append(
            {
                "raters": [a, b],
                "shared": len(shared),
                "agreement": _fraction(sum(p == q for p, q in zip(x, y)), len(shared)),
                "kappa": None if kappa is None else round(kappa, 4),
            }
        )

    ai_human = []
    for ai in [r for r in sorted(by_rater) if kinds.get(r) == "ai"]:
        x, y = [], []
        for cid, choice in by_rater[ai].items():
            human = resolve([by_rater[h][cid] for h in humans if cid in by_rater[h]])
            if human is not None:
                x.append(choice)
                y.append(human)
        kappa = cohen_kappa(x, y)
        ai_human.append(
            {
                "ai_rater": ai,
                "shared": len(x),
                "agreement": _fraction(sum(p == q for p, q in zip(x, y)), len(x)),
                "kappa": None if kappa is None else round(kappa, 4),
            }
        )

    return {
        "threshold": threshold,
        "comparisons": len(comparisons),
        "ratings": sum(len(v) for v in by_rater.values()),
        "raters": raters,
        "flagged": [name for name, info in raters.items() if info["flagged"]],
        "pairwise": pairs,
        "pending_tiebreaks": store.pending_tiebreaks(),
        "ai_human": ai_human,
    }


def format_report(report: dict) -> str:
    lines = [f"{report['comparisons']} comparisons, {report['ratings']} ratings"]
    lines.append(f"{'rater':<16}{'kind':<7}{'ratings':>8}{'consistency':>13}{'gold acc':>10}")
    for name, r in report["raters"].items():
        cons = "-" if r["consistency"] is None else f"{r['consistency']:.0%} ({r['repeats']})"
        gold = "-" if r["gold_accuracy"] is None else f"{r['gold_accuracy']:.0%} ({r['gold']})"
        flag = "  FLAGGED: " + "; ".join(r["reasons"]) if r["flagged"] else ""
        lines.append(f"{name:<16}{r['kind']:<7}{r['ratings']:>8}{cons:>13}{gold:>10}{flag}")
    for p in report["pairwise"]:
        kappa = "n/a" if p["kappa"] is None else f"{p['kappa']:.2f}"
        lines.append(
            f"{p['raters'][0]} vs {p['raters'][1]}: agreement {p['agreement']:.0%} "
            f"on {p['shared']}, kappa {kappa}"
        )
    for p in report["ai_human"]:
        kappa = "n/a" if p["kappa"] is None else f"{p['kappa']:.2f}"
        agreement = "n/a" if p["agreement"] is None else f"{p['agreement']:.0%}"
        lines.append(
            f"AI {p['ai_rater']} vs human majority: agreement {agreement} "
            f"on {p['shared']}, kappa {kappa}"
        )
    lines.append(f"waiting for a tie-break: {len(report['pending_tiebreaks'])}")
    return "\n".join(lines)
