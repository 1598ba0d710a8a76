"""Evaluation: the model's records against gold labels, beside the keyword baseline.

Metrics: category accuracy and macro-F1 (over the categories present in the gold labels),
urgency accuracy (where a label exists), entity precision/recall by exact match (only for
fields whose gold value is known: Bitext labels order numbers and nothing else), JSON
validity (the answer parsed into the schema), rule validity (the validator passed),
hallucinated-entity rate (non-null values that are not verbatim spans of the ticket), mean
latency, and a confusion matrix as PNG.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmstack.triage.baseline import keyword_category, keyword_urgency
from lmstack.triage.grounding import ungrounded
from lmstack.triage.schema import CATEGORIES, ENTITY_FIELDS, TriageRecord


@dataclass
class Gold:
    text: str
    category: str | None
    urgency: str | None = None
    entities: dict | None = None  # field -> value or None; absent fields are unknown


def accuracy(gold: list, pred: list) -> float | None:
    pairs = [(g, p) for g, p in zip(gold, pred) if g is not None]
    return round(sum(g == p for g, p in pairs) / len(pairs), 4) if pairs else None


def macro_f1(gold: list, pred: list) -> float | None:
    pairs = [(g, p) for g, p in zip(gold, pred) if g is not None]
    labels = sorted({g for g, _ in pairs})
    if not labels:
        return None
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in pairs)
        fp = sum(g != label and p == label for g, p in pairs)
        fn = sum(g == label and p != label for g, p in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return round(sum(scores) / len(scores), 4)


def entity_scores(golds: list[Gold], records: list[TriageRecord]) -> dict:
    """Exact-match precision/recall per field, over tickets where that field's gold is known."""
    result = {}
    totals = Counter()
    for name in ENTITY_FIELDS:
        tp = fp = fn = known = 0
        for gold, record in zip(golds, records):
            if gold.entities is None or name not in gold.entities:
                continue
            known += 1
            want, got = gold.entities[name], getattr(record.entities, name)
            if got is not None and got == want:
                tp += 1
            else:
                fp += got is not None
                fn += want is not None
        if known:
            result[name] = {
                "precision": round(tp / (tp + fp), 4) if tp + fp else None,
                "recall": round(tp / (tp + fn), 4) if tp + fn else None,
                "gold_mentions": tp + fn,
                "tickets": known,
            }
            totals.update(tp=tp, fp=fp, fn=fn)
    tp, fp, fn = totals["tp"], totals["fp"], totals["fn"]
    result["all"] = {
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
    }
    return result


def evaluate(
    golds: list[Gold],
    records: list[TriageRecord],
    wall_s: float | None = None,
    other_categories: dict[str, list[str]] | None = None,
) -> dict:
    """The model's metrics, the keyword baseline's, and category scores of any
    `other_categories` predictors on the same tickets (e.g. the classifier alone)."""
    n = len(golds)
    pred_cat = [r.category for r in records]
    pred_urg = [r.urgency for r in records]
    gold_cat = [g.category for g in golds]
    gold_urg = [g.urgency for g in golds]
    values = hallucinated = 0
    for gold, record in zip(golds, records):
        entities = record.entities.model_dump()
        values += sum(v is not None for v in entities.values())
        hallucinated += len(ungrounded(entities, gold.text))
    parsed = sum(r.category is not None and r.urgency is not None for r in records)
    model = {
        "category_accuracy": accuracy(gold_cat, pred_cat),
        "category_macro_f1": macro_f1(gold_cat, pred_cat),
        "urgency_accuracy": accuracy(gold_urg, pred_urg),
        "entities": entity_scores(golds, records),
        "json_validity": round(parsed / n, 4) if n else None,
        "rule_validity": round(sum(r.valid for r in records) / n, 4) if n else None,
        "hallucinated_entity_rate": round(hallucinated / values, 4) if values else 0.0,
        "entity_values": values,
        "mean_latency_s": round(sum(r.latency_s for r in records) / n, 3) if n else None,
        "mean_attempts": round(sum(r.attempts for r in records) / n, 3) if n else None,
    }
    if wall_s is not None:
        model["wall_s"] = round(wall_s, 2)
        model["tickets_per_s"] = round(n / wall_s, 3) if wall_s else None
    base_cat = [keyword_category(g.text) for g in golds]
    base_urg = [keyword_urgency(g.text) for g in golds]
    baseline = {
        "category_accuracy": accuracy(gold_cat, base_cat),
        "category_macro_f1": macro_f1(gold_cat, base_cat),
        "urgency_accuracy": accuracy(gold_urg, base_urg),
    }
    others = {
        name: {
            "category_accuracy": accuracy(gold_cat, predicted),
            "category_macro_f1": macro_f1(gold_cat, predicted),
        }
        for name, predicted in (other_categories or {}).items()
    }
    return {
        "tickets": n,
        "gold_categories": dict(Counter(c for c in gold_cat if c)),
        "model": model,
        "keyword_baseline": baseline,
        "others": others,
        "confusion": confusion(gold_cat, pred_cat),
    }


def confusion(gold: list, pred: list) -> dict:
    """{gold: {predicted: count}} over CATEGORIES (unparsed answers count as 'none')."""
    table = {g: dict.fromkeys([*CATEGORIES, "none"], 0) for g in CATEGORIES}
    for g, p in zip(gold, pred):
        if g in table:
            table[g][p if p in CATEGORIES else "none"] += 1
    return table


def plot_confusion(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in CATEGORIES if sum(table[c].values())]
    cols = [*CATEGORIES] + (["none"] if any(table[r]["none"] for r in rows) else [])
    grid = [[table[r][c] for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.8 * len(rows) + 1.8))
    ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    peak = max(max(r) for r in grid) or 1
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            color = "white" if value > peak / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(triager, tickets, golds: list[Gold], on_done=None) -> tuple[list, dict]:
    started = time.monotonic()
    records = triager.triage_many(tickets, on_done=on_done)
    return records, evaluate(golds, records, time.monotonic() - started)
