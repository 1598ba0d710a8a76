"""Evaluation: retrieval quality per mode side by side, and optionally answer quality.

Questions file: JSONL, one `{"question": str, "doc_ids": [str], "answerable": bool,
"answer": str}` per line (the last two optional; answerable defaults to true). A retrieved
chunk is relevant when its doc_id is in the question's doc_ids.

- recall@k: the share of the question's doc_ids found among the top k chunks.
- MRR: 1 / rank of the first relevant chunk (0 when none in the top 10).
- nDCG@10: binary relevance per chunk; the ideal ranking puts all of the relevant
  documents' chunks (as many as the store holds, up to 10) first.
Unanswerable questions are left out of retrieval metrics. With answers: SQuAD-style token
F1 against `answer` on answerable questions, and abstention accuracy on unanswerable ones
(plus how often an answerable one was wrongly declined).
"""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lmstack.docqa.documents import iter_jsonl
from lmstack.docqa.retrieve import MODES, Retriever
from lmstack.errors import InputError

DEPTH = 10


@dataclass
class Question:
    question: str
    doc_ids: list[str]
    answerable: bool = True
    answer: str | None = None


def load_questions(path: Path) -> list[Question]:
    if not path.is_file():
        raise InputError(f"{path}: no such questions file")
    questions, problems = [], []
    for number, row in iter_jsonl(path):
        if isinstance(row, str):
            problems.append(f"line {number}: {row}")
            continue
        question = row.get("question")
        doc_ids = row.get("doc_ids", [])
        if not isinstance(question, str) or not question.strip():
            problems.append(f"line {number}: no 'question' string")
            continue
        if not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids):
            problems.append(f"line {number}: 'doc_ids' must be a list of strings")
            continue
        answerable = bool(row.get("answerable", True))
        if answerable and not doc_ids:
            problems.append(f"line {number}: an answerable question needs doc_ids")
            continue
        questions.append(Question(question, doc_ids, answerable, row.get("answer")))
    if problems:
        raise InputError(f"{path}: {len(problems)} bad lines: " + "; ".join(problems[:5]))
    if not questions:
        raise InputError(f"{path}: no questions")
    return questions


def retrieval_metrics(ranked_doc_ids: list[str], relevant: set[str], ideal_hits: int) -> dict:
    found = lambda k: len(relevant & set(ranked_doc_ids[:k])) / len(relevant)  # noqa: E731
    first = next((i for i, d in enumerate(ranked_doc_ids[:DEPTH], 1) if d in relevant), None)
    dcg = sum(
        1 / math.log2(i + 1) for i, d in enumerate(ranked_doc_ids[:DEPTH], 1) if d in relevant
    )
    idcg = sum(1 / math.log2(i + 1) for i in range(1, min(DEPTH, ideal_hits) + 1))
    return {
        "recall@1": found(1),
        "recall@5": found(5),
        "recall@10": found(10),
        "mrr": 1 / first if first else 0.0,
        "ndcg@10": dcg / idcg if idcg else 0.0,
    }


def evaluate_retrieval(retriever: Retriever, questions: list[Question], modes=MODES) -> dict:
    chunk_counts = {r.doc_id: r.chunks for r in retriever.store.documents()}
    answerable = [q for q in questions if q.answerable]
    report: dict = {"questions": len(answerable)}
    for mode in modes:
        totals: Counter = Counter()
        latencies = []
        per_question = []
        for q in answerable:
            hits = retriever.search(q.question, DEPTH, mode)
            latencies.append(retriever.last_timing["total_s"])
            relevant = set(q.doc_ids)
            ideal = sum(chunk_counts.get(d, 0) for d in relevant)
            metrics = retrieval_metrics([h.doc_id for h in hits], relevant, ideal)
            totals.update(metrics)
            per_question.append(metrics["recall@5"])
        n = max(1, len(answerable))
        report[mode] = {k: round(v / n, 4) for k, v in totals.items()}
        latencies.sort()
        report[mode]["latency_p50_ms"] = round(1000 * latencies[len(latencies) // 2], 2)
        report[mode]["missed@5"] = [q.question for q, r in zip(answerable, per_question) if r < 1]
    return report


def _normalize(text: str) -> list[str]:
    text = re.sub(r"\[\d+(?:\s*,\s*\d+)*\]", " ", text.lower())
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _normalize(prediction), _normalize(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def evaluate_answers(
    answerer, questions: list[Question], strategy: str = "rag", workers: int = 8, progress=None
) -> dict:
    """Ask every question (several at once: the engine batches them) and score answers."""
    start = time.perf_counter()

    def ask(q: Question):
        result = answerer.ask(q.question, strategy)
        if progress:
            progress(1)
        return result

    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(ask, questions))
    f1s = [
        token_f1(a.answer, q.answer)
        for q, a in zip(questions, answers)
        if q.answerable and q.answer
    ]
    unanswerable = [a.abstained for q, a in zip(questions, answers) if not q.answerable]
    declined = [a.abstained for q, a in zip(questions, answers) if q.answerable]
    cited = [bool(a.citations) for q, a in zip(questions, answers) if q.answerable]
    return {
        "strategy": strategy,
        "answer_f1": round(sum(f1s) / len(f1s), 4) if f1s else None,
        "answers_scored": len(f1s),
        "abstention_accuracy": (
            round(sum(unanswerable) / len(unanswerable), 4) if unanswerable else None
        ),
        "unanswerable": len(unanswerable),
        "false_abstention_rate": round(sum(declined) / len(declined), 4) if declined else None,
        "cited_rate": round(sum(cited) / len(cited), 4) if cited else None,
        "seconds": round(time.perf_counter() - start, 1),
        "examples": [
            {"question": q.question, "answer": a.answer, "reference": q.answer}
            for q, a in list(zip(questions, answers))[:3]
        ],
    }
