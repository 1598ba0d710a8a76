"""`lmstack docs bench`: ingestion time for a real report and retrieval latency at scale.

1. Ingest a folder (default: the NIST report) into a fresh store: seconds, chunks, tokens.
2. Build a store of N chunks (default 10,000) of real text: passages cut from the same
   folder at many offsets, ingested as a JSONL corpus (one short document per passage, so
   it also measures the many-small-documents path).
3. Time every retrieval mode on the questions file against that store (P50/P99), beside a
   baseline: exact cosine search over the same vectors with NumPy in memory.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from lmstack.docqa.documents import expand, read_path
from lmstack.docqa.evaluate import load_questions
from lmstack.docqa.ingest import Ingestor
from lmstack.docqa.retrieve import MODES, Retriever
from lmstack.docqa.store import DocStore
from lmstack.embed import Embedder


def _passages(folder: Path, count: int, words: int, seed: int = 0) -> list[str]:
    text = " ".join(
        page for path in expand([folder]) for doc in read_path(path) for _, page in doc.pages
    ).split()
    rng = random.Random(seed)
    return [
        " ".join(text[start : start + words])
        for start in (rng.randrange(0, max(1, len(text) - words)) for _ in range(count))
    ]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def run_bench(
    folder: Path,
    questions_path: Path,
    tokenizer,
    chunks: int = 10_000,
    words: int = 64,
    repeats: int = 3,
    workdir: Path | None = None,
    log=print,
) -> dict:
    embedder = Embedder.shared()
    questions = [q.question for q in load_questions(questions_path)]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        log(f"ingesting {folder} ...")
        report_store = DocStore(tmp / "report.db")
        ingest = Ingestor(report_store, embedder, tokenizer).ingest([folder])
        log(f"  {ingest.chunks} chunks, {ingest.tokens:,} tokens in {ingest.seconds:.1f} s")

        corpus = tmp / "passages.jsonl"
        with corpus.open("w") as out:
            for i, text in enumerate(_passages(folder, chunks, words)):
                out.write(json.dumps({"id": f"p{i:05d}", "text": text}) + "\n")
        log(f"building a {chunks:,}-chunk store ...")
        big = DocStore(tmp / "big.db")
        big_report = Ingestor(big, embedder, tokenizer).ingest([corpus])
        log(f"  {big_report.chunks:,} chunks in {big_report.seconds:.1f} s")

        retriever = Retriever(big, embedder)
        latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for question in questions:
                for mode in MODES:
                    retriever.search(question, 5, mode)
                    latencies[mode].append(retriever.last_timing["total_s"])

        # Baseline: exact cosine in NumPy over the same vectors, read back from the store.
        vectors = np.asarray(
            [row["dense"] for row in big.iterate("lmstack_chunks", "", ["dense"])],
            dtype=np.float32,
        )
        baseline = []
        for _ in range(repeats):
            for question in questions:
                start = time.perf_counter()
                scores = vectors @ embedder.embed_query(question)
                np.argpartition(-scores, 5)[:5]
                baseline.append(time.perf_counter() - start)
        big.close()
        report_store.close()
    rows = {
        mode: {
            "p50_ms": round(1000 * _percentile(values, 50), 2),
            "p99_ms": round(1000 * _percentile(values, 99), 2),
        }
        for mode, values in latencies.items()
    }
    rows["numpy exact dense (baseline)"] = {
        "p50_ms": round(1000 * _percentile(baseline, 50), 2),
        "p99_ms": round(1000 * _percentile(baseline, 99), 2),
    }
    return {
        "ingest": {
            "folder": str(folder),
            "documents": ingest.documents,
            "chunks": ingest.chunks,
            "tokens": ingest.tokens,
            "seconds": round(ingest.seconds, 2),
        },
        "store": {
            "chunks": big_report.chunks,
            "seconds": round(big_report.seconds, 2),
            "chunks_per_s": round(big_report.chunks / max(big_report.seconds, 1e-9), 1),
        },
        "queries": len(questions) * repeats,
        "latency": rows,
        "samples": latencies,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, values in result["samples"].items():
        ms = np.sort(np.asarray(values) * 1000)
        ax.plot(ms, np.linspace(0, 1, len(ms)), label=mode)
    ax.axvline(200, color="grey", linestyle="--", label="200 ms target")
    ax.set_xlabel("retrieval latency (ms)")
    ax.set_ylabel("share of queries")
    ax.set_title(f"Retrieval latency on {result['store']['chunks']:,} chunks (top-5)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
