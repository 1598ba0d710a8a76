"""The document store survives killed ingestions and a second writer (issue 17, point 8).

Crashes are real: a worker process (store_worker.py) forks one child per ingestion, and the
LMSTACK_TEST_CRASH_AT hook SIGKILLs the child at a named step of the write. Afterwards
every live document must have exactly its chunks, the content of either its old or its new
version (compared with fresh ingestions of both), and the next ingestion must repair it.

Milvus Lite locks a store to the first process that opens it (an flock on <store>/LOCK,
held until that process exits), so two processes cannot write one store at once: the second
gets an error that says so. Two writers at once are tested as two DocStore clients in one
process (what two processes on a Milvus server amount to), one paused mid-write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmstack.docqa import store as store_module
from lmstack.docqa.records import MAX_HEADINGS_BYTES, MAX_META_BYTES
from lmstack.docqa.store import CHUNKS, DocStore
from lmstack.docqa.versions import CRASH_POINTS
from lmstack.errors import LmstackError

WORKER = Path(__file__).with_name("store_worker.py")
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


def _text(seed: int, words: int) -> str:
    return " ".join(f"{WORDS[(seed * 7 + i) % len(WORDS)]}{seed}x{i}" for i in range(words))


def _corpus(folder: Path, version: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs = {
        "a.md": f"# Alpha\n\n{_text(1, 40 if version == 1 else 70)}\n",
        "b.md": f"# Bravo\n\n{_text(2, 8 + version)}\n",
        "c.txt": _text(3, 30),
        "d.md": f"# Delta\n\n{_text(4, 12)}\n",
    }
    if version == 2:
        docs["e.md"] = f"# Echo\n\n{_text(5, 25)}\n"
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder


class Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def send(self, store: Path, steps: list[dict], crash_at: str | None = None) -> None:
        command = {"store": str(store), "steps": steps, "crash_at": crash_at}
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the store worker exited"
        return json.loads(line)

    def run(self, store: Path, steps: list[dict], crash_at: str | None = None) -> dict:
        self.send(store, steps, crash_at)
        reply = self.reply()
        assert "error" not in reply, reply["error"]
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, worker):
    """v1 and v2 folders, a base store holding v1, and fresh-ingest states of both."""
    root = tmp_path_factory.mktemp("corpora")
    v1, v2 = _corpus(root / "v1", 1), _corpus(root / "v2", 2)
    base = root / "base.db"
    ref1 = worker.run(base, [{"op": "ingest", "paths": [str(v1)]}, {"op": "state"}])
    ref2 = worker.run(root / "ref2.db", [{"op": "ingest", "paths": [str(v2)]}, {"op": "state"}])
    return v1, v2, base, ref1["results"][1]["docs"], ref2["results"][1]["docs"]


def _assert_whole(state: dict, ref1: dict, ref2: dict) -> None:
    docs = state["docs"]
    assert set(ref1) <= set(docs) <= set(ref1) | set(ref2), sorted(docs)  # nothing lost
    for doc_id, doc in docs.items():
        assert doc["live_ids"] == list(range(doc["chunks"])), (doc_id, doc)
        versions = [(r[doc_id]["hash"], r[doc_id]["chunks"]) for r in (ref1, ref2) if doc_id in r]
        assert (doc["hash"], doc["chunks"]) in versions, (doc_id, doc)


CRASHES = [*CRASH_POINTS, "after_chunks:2", "after_registry:2", "any:4", "any:7"]


@pytest.mark.slow
def test_killed_ingestions_leave_whole_documents_and_the_next_add_repairs(
    tmp_path, worker, corpora
):
    v1, v2, base, ref1, ref2 = corpora
    changed = {d for d in ref2 if ref1.get(d, {}).get("hash") != ref2[d]["hash"]}
    assert changed == {"a.md", "b.md", "e.md"}
    assert sum(ref2[d]["chunks"] for d in changed) >= 6  # at least two write batches
    ingest = {"op": "ingest", "paths": [str(v2)]}
    for crash_at in CRASHES:
        store = tmp_path / f"{crash_at.replace(':', '-')}.db"
        shutil.copytree(base, store)
        crashed = worker.run(store, [ingest], crash_at=crash_at)
        assert crashed["status"] == -9, (crash_at, crashed)  # SIGKILL, mid-write
        after = worker.run(
            store, [{"op": "state"}, ingest, {"op": "state"}, {"op": "gc", "min_age_s": 0},
                    {"op": "state"}],
        )  # fmt: skip
        half, report, repaired, _, collected = after["results"]
        _assert_whole(half, ref1, ref2)
        # The repair re-ingests exactly what is not yet v2, and then the store is v2.
        stale = {d for d in ref2 if half["docs"].get(d, {}).get("hash") != ref2[d]["hash"]}
        assert set(report["added"]) | set(report["replaced"]) == stale, (crash_at, report)
        assert not report["failed"]
        for doc_id, doc in repaired["docs"].items():
            assert (doc["hash"], doc["chunks"], doc["live_ids"]) == (
                ref2[doc_id]["hash"], ref2[doc_id]["chunks"], ref2[doc_id]["live_ids"],
            ), (crash_at, doc_id)  # fmt: skip
        assert set(repaired["docs"]) == set(ref2)
        # Orphans of the killed write are young, so kept until GC is told they may go.
        live_rows = sum(d["chunks"] for d in ref2.values())
        assert collected["rows"] == live_rows, (crash_at, collected["rows"], live_rows)


def test_a_document_whose_chunks_are_missing_is_reingested(tmp_path, worker, corpora):
    v1 = corpora[0]
    ingest = {"op": "ingest", "paths": [str(v1)]}
    reply = worker.run(
        tmp_path / "lost.db", [ingest, {"op": "drop", "doc_id": "c.txt"}, ingest, {"op": "state"}]
    )
    first, dropped, again, state = reply["results"]
    assert dropped > 0 and "c.txt" in first["added"]
    assert again["replaced"] == ["c.txt"] and "c.txt" not in again["unchanged"]
    doc = state["docs"]["c.txt"]
    assert doc["chunks"] == dropped and doc["live_ids"] == list(range(dropped))


def test_a_second_process_is_refused_while_the_first_holds_the_store(tmp_path, worker, corpora):
    store = tmp_path / "held.db"
    shutil.copytree(corpora[2], store)
    worker.send(store, [{"op": "hold"}])
    assert json.loads(worker.proc.stdout.readline()) == {"held": True}
    try:
        with pytest.raises(LmstackError, match="open in another process") as refused:
            DocStore(store)
        assert str(store) in str(refused.value) and "milvus://" in str(refused.value)
    finally:
        worker.proc.stdin.write("done\n")
        worker.proc.stdin.flush()
        assert worker.reply()["status"] == 0
    # Once the holder has exited the store opens, with everything the first writer wrote.
    assert {r.doc_id for r in DocStore(store).documents()} == set(corpora[3])


# ------------------------------------------------------------------ in one process


@pytest.fixture(scope="module")
def ingestor_parts(model):
    from lmstack.embed import Embedder

    return Embedder.shared(), model[1]


def _ingestor(store: DocStore, parts):
    from lmstack.docqa.ingest import Ingestor

    return Ingestor(store, *parts, chunk_tokens=32, overlap=4, batch_chunks=3)


def _assert_complete(store: DocStore, doc_ids: set[str]) -> None:
    records = {r.doc_id: r for r in store.documents()}
    assert doc_ids <= set(records), sorted(records)
    for doc_id in doc_ids:
        chunks = store.chunks_of(doc_id)
        assert [c.chunk_id for c in chunks] == list(range(records[doc_id].chunks)) != []


def test_a_writer_paused_mid_write_keeps_its_chunks_while_another_collects(
    tmp_path, ingestor_parts, monkeypatch
):
    path = tmp_path / "two.db"
    folders = {}
    for who in ("first", "second"):
        folders[who] = tmp_path / who
        folders[who].mkdir()
        for i in range(2):
            (folders[who] / f"{who}-{i}.md").write_text(f"# {who} {i}\n\n{_text(i + 9, 30)}\n")
    paused, resume = threading.Event(), threading.Event()
    real = store_module.checkpoint

    def checkpoint(point):
        if point == "after_chunks" and threading.current_thread().name == "first":
            paused.set()
            assert resume.wait(120)
        real(point)

    monkeypatch.setattr(store_module, "checkpoint", checkpoint)
    first, second = DocStore(path), DocStore(path)  # two clients, each with its own cache
    reports = {}

    def run():
        reports["first"] = _ingestor(first, ingestor_parts).ingest([folders["first"]])

    thread = threading.Thread(target=run, name="first")
    thread.start()
    try:
        assert paused.wait(120)  # its chunks are in, the registry does not name them yet
        reports["second"] = _ingestor(second, ingestor_parts).ingest([folders["second"]])
    finally:
        resume.set()
        thread.join(120)
    assert len(reports["first"].added) == len(reports["second"].added) == 2
    names = {p.name for f in folders.values() for p in f.iterdir()}
    _assert_complete(DocStore(path), names)


def test_a_writer_with_a_stale_cache_never_deletes_another_writers_documents(
    tmp_path, ingestor_parts
):
    path = tmp_path / "stale.db"
    server, cli = DocStore(path), DocStore(path)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "served.md").write_text(f"# Served\n\n{_text(20, 30)}\n")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "from-cli.md").write_text(f"# CLI\n\n{_text(21, 30)}\n")
    _ingestor(server, ingestor_parts).ingest([tmp_path / "one"])
    assert server.live_versions()  # the server's cache, from before the CLI's write
    _ingestor(cli, ingestor_parts).ingest([tmp_path / "two"])
    (tmp_path / "one" / "served.md").write_text(f"# Served\n\n{_text(22, 40)}\n")
    assert _ingestor(server, ingestor_parts).ingest([tmp_path / "one"]).replaced == ["served.md"]
    _assert_complete(DocStore(path), {"served.md", "from-cli.md"})


def test_replacing_one_document_of_a_batch_keeps_the_others(tmp_path, ingestor_parts):
    folder = _corpus(tmp_path / "docs", 1)
    store = DocStore(tmp_path / "batch.db")
    ingestor = _ingestor(store, ingestor_parts)
    ingestor.ingest([folder])
    (folder / "d.md").write_text(f"# Delta\n\n{_text(4, 13)}\n")  # d shares a batch with c
    assert ingestor.ingest([folder]).replaced == ["d.md"]
    _assert_complete(store, {"a.md", "b.md", "c.txt", "d.md"})
    rows = sum(1 for _ in store.iterate(CHUNKS, "", ["pk"]))
    assert rows == sum(r.chunks for r in store.documents())


def test_long_cjk_titles_ids_and_headings_fit_the_store_in_bytes(tmp_path, ingestor_parts):
    folder = tmp_path / "cjk"
    folder.mkdir()
    long_id, title = "文档" * 300, "标题" * 200  # 1,800 and 1,200 bytes of UTF-8
    record = {"id": long_id, "title": title, "text": "向量数据库中的中文文本。" * 20}
    (folder / "corpus.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    heading = "章节" * 600  # a heading path far over the headings field
    (folder / "notes.md").write_text(f"# {heading}\n\n## 小节\n\n{'正文内容。' * 30}\n")
    store = DocStore(tmp_path / "cjk.db")
    ingestor = _ingestor(store, ingestor_parts)
    report = ingestor.ingest([folder], title_field="title")
    assert not report.failed and report.documents == 2, report.as_json()
    stored = store.get(long_id)  # found by the id as given
    assert stored is not None and len(stored.doc_id.encode()) <= MAX_META_BYTES
    assert len(stored.title.encode()) <= MAX_META_BYTES and title.startswith(stored.title)
    for doc_id in (stored.doc_id, "notes.md"):
        for row in store.iterate(CHUNKS, f'doc_id == "{doc_id}"', ["title", "headings"]):
            assert len(row["title"].encode()) <= MAX_META_BYTES
            assert len(row["headings"].encode()) <= MAX_HEADINGS_BYTES
            path = json.loads(row["headings"])  # still valid JSON, cut at whole headings
            assert all(heading.startswith(h) or h == "小节" for h in path)
    assert len(store.chunks_of(long_id)) == stored.chunks
    again = ingestor.ingest([folder], title_field="title")
    assert again.documents == 0 and len(again.unchanged) == 2
