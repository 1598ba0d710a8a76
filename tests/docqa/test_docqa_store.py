"""Ingestion, the Milvus Lite store and retrieval, on the real NIST report and real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import make_pdf, run_cli

from lmstack.config import data_dir
from lmstack.docqa.ingest import Ingestor
from lmstack.docqa.records import Hit
from lmstack.docqa.retrieve import Retriever, fuse, relative_fuse
from lmstack.docqa.store import DocStore
from lmstack.embed import Embedder
from lmstack.errors import InputError

NIST = data_dir() / "nist-sp800-63-3"
QUESTIONS = data_dir() / "nist_questions.jsonl"


@pytest.fixture(scope="module")
def tokenizer(model):
    return model[1]


@pytest.fixture(scope="module")
def nist_store(tmp_path_factory, tokenizer):
    """A store holding the NIST report, ingested once for the module."""
    path = tmp_path_factory.mktemp("nist") / "nist.db"
    store = DocStore(path)
    report = Ingestor(store, Embedder.shared(), tokenizer).ingest([NIST])
    assert not report.failed
    return store, report


def _new_store(tmp_path: Path, tokenizer, name="docs.db"):
    store = DocStore(tmp_path / name)
    return store, Ingestor(store, Embedder.shared(), tokenizer)


def test_nist_ingests_every_file_in_chunks_within_the_limit(nist_store):
    store, report = nist_store
    assert sorted(report.added) == sorted(p.name for p in NIST.glob("*.md"))
    assert report.chunks == store.count_chunks() > 50
    for doc in store.documents():
        chunks = store.chunks_of(doc.doc_id)
        assert [c.chunk_id for c in chunks] == list(range(doc.chunks))
        assert all(0 < c.tokens <= 500 for c in chunks)
    # Headings are kept as metadata and, for glossaries, as text: the term is findable.
    hits = Retriever(store, Embedder.shared()).search("Memorized Secret", 5, "bm25")
    assert any("Memorized Secret" in h.text for h in hits)
    assert all(h.headings for h in hits)


def test_readding_unchanged_is_a_noop_and_a_change_replaces(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# Alpha\n\nThe alpha protocol uses port 7411.\n")
    (folder / "b.txt").write_text("Bravo notes: the bravo team meets on Tuesdays.\n")
    store, ingestor = _new_store(tmp_path, tokenizer)
    first = ingestor.ingest([folder])
    assert sorted(first.added) == ["a.md", "b.txt"]
    again = ingestor.ingest([folder])
    assert again.documents == 0 and sorted(again.unchanged) == ["a.md", "b.txt"]
    version = store.get("a.md").version
    assert store.get("a.md").version == version  # untouched

    (folder / "a.md").write_text("# Alpha\n\nThe alpha protocol now uses port 9000.\n")
    changed = ingestor.ingest([folder])
    assert changed.replaced == ["a.md"] and changed.unchanged == ["b.txt"]
    assert store.get("a.md").version != version
    texts = [h.text for h in store.chunks_of("a.md")]
    assert any("9000" in t for t in texts) and not any("7411" in t for t in texts)
    hits = Retriever(store, Embedder.shared()).search("alpha protocol port", 5)
    assert all("7411" not in h.text for h in hits)
    # No chunk of the old version is left anywhere in the collection.
    assert store.collect_garbage() == 0
    assert len(list(store.iterate("lmstack_chunks", 'doc_id == "a.md"', ["pk"]))) == 1


def test_interrupted_ingestion_leaves_the_earlier_state(tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "docs"
    folder.mkdir()
    doc = folder / "policy.md"
    doc.write_text("# Policy\n\nPasswords rotate every 90 days.\n")
    store, ingestor = _new_store(tmp_path, tokenizer)
    ingestor.ingest([folder])
    doc.write_text("# Policy\n\nPasswords never rotate; length matters more.\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the new chunks were written

    monkeypatch.setattr(store.client, "upsert", crash)
    with pytest.raises(KeyboardInterrupt):
        ingestor.ingest([folder])
    monkeypatch.undo()
    store.flush()
    reopened = DocStore(tmp_path / "docs.db")
    hits = Retriever(reopened, Embedder.shared()).search("password rotation", 5)
    assert [h.text for h in hits] and all("90 days" in h.text for h in hits)
    assert reopened.collect_garbage() == 0  # young: another writer may be about to name it
    assert reopened.collect_garbage(min_age_s=0) == 1  # the unfinished version's chunks go
    report = Ingestor(reopened, Embedder.shared(), tokenizer).ingest([folder])
    assert report.replaced == ["policy.md"]
    assert "never rotate" in reopened.chunks_of("policy.md")[0].text


def test_bad_files_are_reported_and_the_rest_ingested(tmp_path, tokenizer, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nThis file is fine and mentions kerberos.\n")
    (folder / "empty.txt").write_text("")
    (folder / "blob.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf")
    (folder / "paged.pdf").write_bytes(make_pdf(["Intro page.", "Kerberos tickets expire."]))
    store_path = tmp_path / "mixed.db"
    code, out, err = run_cli(
        ["docs", "add", str(folder), str(tmp_path / "missing.md"), "--store", str(store_path)],
        capsys,
    )
    assert code == 2
    for name in ("empty.txt", "blob.txt", "latin1.txt", "broken.pdf", "missing.md"):
        assert name in err
    assert "2 added" in out
    code, out, _ = run_cli(
        ["docs", "search", "kerberos tickets", "--store", str(store_path), "--json"], capsys
    )
    assert code == 0
    results = json.loads(out)
    assert {"doc_id", "chunk_id", "title", "page", "score", "text"} <= set(results[0])
    assert results[0]["doc_id"] == "paged.pdf" and results[0]["page"] == 2


def test_jsonl_corpus_uses_the_id_field_and_remove_works(tmp_path, tokenizer, capsys):
    corpus = tmp_path / "faq.jsonl"
    rows = [
        {"key": "faq-1", "body": "Refunds are issued within 14 days.", "name": "Refunds"},
        {"key": "faq-2", "body": "Shipping to Canada takes a week.", "name": "Shipping"},
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    store_path = str(tmp_path / "faq.db")
    args = ["--text-field", "body", "--id-field", "key", "--title-field", "name"]
    code, out, _ = run_cli(["docs", "add", str(corpus), "--store", store_path, *args], capsys)
    assert code == 0 and "line 3" in out
    code, out, _ = run_cli(
        ["docs", "search", "how long do refunds take", "--store", store_path, "--json"], capsys
    )
    top = json.loads(out)[0]
    assert (top["doc_id"], top["title"]) == ("faq-1", "Refunds")
    code, out, _ = run_cli(["docs", "list", "--store", store_path, "--json"], capsys)
    assert [d["doc_id"] for d in json.loads(out)] == ["faq-1", "faq-2"]
    code, out, err = run_cli(["docs", "remove", "faq-1", "--store", store_path], capsys)
    assert code == 0 and "faq-1" in out
    code, _, err = run_cli(["docs", "remove", "faq-1", "--store", store_path], capsys)
    assert code == 2 and "faq-1" in err
    code, out, _ = run_cli(["docs", "list", "--store", store_path, "--json"], capsys)
    assert [d["doc_id"] for d in json.loads(out)] == ["faq-2"]


def test_search_errors_are_clear(tmp_path, capsys):
    empty = str(tmp_path / "empty.db")
    code, _, err = run_cli(["docs", "search", "anything", "--store", empty], capsys)
    assert code == 2 and "holds no documents" in err
    code, _, err = run_cli(["docs", "search", "x", "--top-k", "0", "--store", empty], capsys)
    assert code == 2 and "--top-k" in err and "got 0" in err
    with pytest.raises(InputError, match="not a Milvus Lite store"):
        (tmp_path / "notes.db").write_text("hello")
        DocStore(tmp_path / "notes.db")


def test_modes_and_fusion(nist_store):
    store, _ = nist_store
    retriever = Retriever(store, Embedder.shared())
    question = "Which assurance level requires in-person identity proofing?"
    for mode in ("bm25", "dense", "hybrid"):
        hits = retriever.search(question, 5, mode)
        assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    with pytest.raises(InputError, match="--mode"):
        retriever.search(question, 5, "magic")
    # Fusion: a chunk both lists rank well beats one that only a single list ranks first.
    a, b, c = (Hit("d", i, "", None, [], "", 0, 0.0) for i in range(3))
    fused = fuse({"dense": [a, b], "bm25": [c, b]}, 3)
    assert fused[0].chunk_id == 1 and fused[0].scores["dense_rank"] == 2
    # Relative score fusion keeps margins: a clear first in one list beats a pair of
    # middling seconds, which RRF would rank first.
    x, y, z = (Hit("d", i, "", None, [], "", 0, s) for i, s in ((0, 0.9), (1, 0.5), (2, -9.0)))
    y2 = Hit("d", 1, "", None, [], "", 0, -5.0)
    rel = relative_fuse({"dense": [x, y], "bm25": [z, y2]}, 3)
    assert [h.chunk_id for h in rel] == [0, 2, 1] or [h.chunk_id for h in rel] == [2, 0, 1]
    assert rel[0].score == pytest.approx(1.0) and rel[2].score == pytest.approx(0.0)
    assert fuse({"dense": [x, y], "bm25": [z, y2]}, 3)[0].chunk_id == 1
    with pytest.raises(InputError, match="--fusion"):
        Retriever(store, Embedder.shared(), fusion="max")
    hits = Retriever(store, Embedder.shared(), "relative").search(question, 5)
    assert len(hits) == 5 and all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert not retriever.relevant("What is the boiling point of water?", retriever.search(
        "What is the boiling point of water?", 5))  # fmt: skip
    assert retriever.relevant(question, retriever.search(question, 5))


def test_dev_set_targets_hold(nist_store, capsys):
    """The issue's targets on our dev set (82 answerable questions): hybrid recall@5 >= 0.9
    and hybrid at least as good as the better of bm25 and dense on recall@5 and MRR. The
    first 42 (keyword-friendly: BM25 alone reached MRR 0.941 there, hybrid 0.933) would fail
    the MRR part on their own; the 40 added later, written without seeing any retrieval
    result, paraphrase and pose scenarios, where fusion gains most."""
    from lmstack.docqa.evaluate import evaluate_retrieval, load_questions

    store, _ = nist_store
    questions = load_questions(QUESTIONS)
    assert len(questions) >= 90
    report = evaluate_retrieval(Retriever(store, Embedder.shared()), questions)
    hybrid, bm25, dense = report["hybrid"], report["bm25"], report["dense"]
    assert hybrid["recall@5"] >= 0.9, report
    assert hybrid["recall@5"] >= max(bm25["recall@5"], dense["recall@5"]), report
    assert hybrid["mrr"] >= max(bm25["mrr"], dense["mrr"]), report
    assert hybrid["mrr"] > 0.85 and hybrid["ndcg@10"] >= max(bm25["ndcg@10"], dense["ndcg@10"])
    assert report["questions"] == sum(q.answerable for q in questions)


def test_dev_set_relevance_gate_declines_off_topic_only(nist_store):
    """The "nothing relevant" gate: every off-topic dev question (capitals, football,
    prices) is declined and no answerable one is. On-topic questions the report does not
    answer pass the gate by design: their nearest chunks are on topic (cosine 0.27-0.72)."""
    from lmstack.docqa.evaluate import load_questions

    store, _ = nist_store
    retriever = Retriever(store, Embedder.shared())
    questions = load_questions(QUESTIONS)
    declined = {
        q.question
        for q in questions
        if not retriever.relevant(q.question, retriever.search(q.question, 5))
    }
    off_topic = {
        "What is the capital city of Australia?",
        "What is the boiling point of water at sea level?",
        "Who won the 2018 FIFA World Cup?",
        "What is the price of a YubiKey?",
    }
    assert off_topic <= declined
    assert not declined & {q.question for q in questions if q.answerable}, declined


def test_eval_cli_json_shape(nist_store, tmp_path, capsys):
    store, _ = nist_store
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"question": "What does AAL2 require?", "doc_ids": ["sec5_DIRM.md"]})
        + "\n"
        + json.dumps({"question": "Best pizza in Naples?", "doc_ids": [], "answerable": False})
        + "\n"
    )
    code, out, err = run_cli(
        ["docs", "eval", "--questions", str(questions), "--store", store.uri, "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["questions"] == 1
    for mode in ("bm25", "dense", "hybrid"):
        assert {"recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"} <= set(report[mode])
        assert 0 <= report[mode]["ndcg@10"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\nnot json\n')
    code, _, err = run_cli(["docs", "eval", "--questions", str(bad), "--store", store.uri], capsys)
    assert code == 2 and "line 1" in err and "line 2" in err


def test_retrieval_metrics_by_hand():
    from lmstack.docqa.evaluate import retrieval_metrics, token_f1

    m = retrieval_metrics(["x", "a", "y", "a"], {"a"}, ideal_hits=2)
    assert m["recall@1"] == 0 and m["recall@5"] == 1 and m["mrr"] == 0.5
    # DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
    assert m["ndcg@10"] == pytest.approx((1 / 1.58496 + 1 / 2.32193) / (1 + 1 / 1.58496), 1e-4)
    assert token_f1("The cat sat [1].", "the cat sat") == 1.0
    assert token_f1("dog", "cat") == 0.0


def test_store_copy_is_independent(nist_store, tmp_path):
    """A store folder copied elsewhere opens and answers (Milvus Lite keeps it as files)."""
    store, _ = nist_store
    store.flush()
    copy = tmp_path / "copy.db"
    shutil.copytree(store.uri, copy, ignore=shutil.ignore_patterns("LOCK"))
    assert DocStore(copy).count_chunks() == store.count_chunks()


@pytest.mark.slow
def test_bench_command_reports_ingest_and_latency(tmp_path, capsys):
    folder = tmp_path / "report"
    folder.mkdir()
    shutil.copy(NIST / "sec5_DIRM.md", folder)
    out, png = tmp_path / "bench.json", tmp_path / "latency.png"
    code, stdout, err = run_cli(
        ["docs", "bench", "--folder", str(folder), "--questions", str(QUESTIONS),
         "--chunks", "60", "--words", "20", "--repeats", "1", "--json", str(out),
         "--png", str(png)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["ingest"]["documents"] == 1 and result["store"]["chunks"] == 60
    assert set(result["latency"]) == {"hybrid", "dense", "bm25", "numpy exact dense (baseline)"}
    assert all(row["p50_ms"] > 0 for row in result["latency"].values())
    assert png.stat().st_size > 10_000 and "P50 ms" in stdout


def test_same_doc_id_from_two_paths_is_refused(tmp_path, tokenizer):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.md").write_text(f"# Notes\n\nFrom folder {folder}.\n")
    store, ingestor = _new_store(tmp_path, tokenizer)
    report = ingestor.ingest([tmp_path / "one", tmp_path / "two"])
    assert report.added == ["notes.md"]
    assert len(report.failed) == 1 and "also comes from" in report.failed[0][1]
    assert "folder one" in store.chunks_of("notes.md")[0].text


def test_embeddings_do_not_depend_on_what_was_embedded_before():
    """Nothing from an earlier call (tokenizer truncation state, batch make-up) leaks into
    a later vector: the same text embeds the same alone, after others, or in a batch."""
    embedder = Embedder.shared()
    text = "Authenticator assurance levels " * 120
    alone = embedder.embed([text])[0]
    embedder.embed(["short text", "another short text"])
    batched = embedder.embed(["x", text, "a medium length sentence about passwords"])[1]
    assert float(alone @ batched) > 0.99999
