"""AI feedback: a model rates planned comparisons against written principles (RLAIF).

Each comparison is judged twice, once in each order, with a JSON-schema-constrained verdict
({"choice": "A" | "B" | "tie" | "neither"}); a verdict that flips with the order is position
bias, not a preference, and is stored as a tie. Ratings go into the same store as human
ratings under a rater of kind "ai" (named after the model), so QC reports AI-human agreement.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lmstack.align.ratings import CHOICES, RatingStore
from lmstack.errors import InputError

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"choice": {"type": "string", "enum": list(CHOICES)}},
    "required": ["choice"],
    "additionalProperties": False,
}
MIRROR = {"A": "B", "B": "A", "tie": "tie", "neither": "neither"}


def load_principles(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise InputError(f"no such principles file: {path}")
    rules = [
        line.strip().lstrip("-*0123456789. ").strip()
        for line in Path(path).read_text(encoding="utf-8").splitlines()
    ]
    rules = [r for r in rules if r and not r.startswith("#")]
    if not rules:
        raise InputError(f"{path} has no principles (one per line)")
    return rules


def judge_messages(principles: list[str], messages: list[dict], a: str, b: str) -> list[dict]:
    conversation = "\n".join(
        f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system"
    )
    rules = "\n".join(f"- {r}" for r in principles)
    return [
        {
            "role": "system",
            "content": "You compare two assistant replies and say which one better follows "
            "the principles. Answer with JSON only.",
        },
        {
            "role": "user",
            "content": f"Principles:\n{rules}\n\nConversation:\n{conversation}\n\n"
            f"Response A:\n{a}\n\nResponse B:\n{b}\n\n"
            'Which response is better? Reply {"choice": "A"}, {"choice": "B"}, '
            '{"choice": "tie"} or {"choice": "neither"}.',
        },
    ]


def _choice(completion) -> str | None:
    import json

    if completion.error:
        return None
    try:
        value = json.loads(completion.text).get("choice")
    except (ValueError, AttributeError):
        return None
    return value if value in CHOICES else None


def rate_ai(store: RatingStore, principles: list[str], generator, limit: int | None = None):
    from lmstack.llm import ChatRequest

    # The model's name: a remote generator's `name` is "MODEL at URL", its `model` the id.
    model = getattr(generator, "model", None) or generator.name
    rater = f"ai:{Path(str(model)).name or 'model'}"
    store.ensure_rater(rater, "ai")
    done = set(store.ratings_of(rater))
    todo = [c for c in store.comparisons() if c.id not in done][: limit or None]
    requests = []
    for c in todo:
        for a, b in ((c.a_text, c.b_text), (c.b_text, c.a_text)):
            requests.append(
                ChatRequest(
                    judge_messages(principles, c.messages, a, b),
                    max_tokens=32,  # room for JSON grammars that allow whitespace (llama.cpp)
                    temperature=0.0,
                    json_schema=VERDICT_SCHEMA,
                )
            )
    results = generator.complete_many(requests) if requests else []
    counts: Counter = Counter()
    failed = 0
    for i, c in enumerate(todo):
        first, second = _choice(results[2 * i]), _choice(results[2 * i + 1])
        if first is None or second is None:
            failed += 1
            continue
        verdict = first if first == MIRROR[second] else "tie"  # order-dependent: no preference
        store.rate(rater, c.id, verdict, note=f"orders: {first}/{second}", require_assignment=False)
        counts[verdict] += 1
    return {
        "rater": rater,
        "rated": sum(counts.values()),
        "failed": failed,
        "choices": dict(counts),
    }
