"""A process that ingests into document stores for test_store_crash.py, and dies on cue.

Loading the embedder takes most of a process start, so this worker loads it (and the
tokenizer) once and forks one child per command: the child opens the store, runs the
command's steps with the real Ingestor and DocStore, and may be killed mid-write by the
LMSTACK_TEST_CRASH_AT hook (lmstack/docqa/versions.py). The worker never opens a store
itself (Milvus Lite's lock and gRPC stay in the children), and torch runs on one thread.

Protocol: one JSON command per stdin line, {"store": path, "steps": [...], "crash_at": str};
one JSON reply per stdout line, {"status": exit code (negative: the signal), "results": [...]}.
Steps: {"op": "ingest", "paths": [...], "title_field": str?}; {"op": "state"};
{"op": "gc", "min_age_s": float}; {"op": "drop", "doc_id": str} (delete a document's live
chunks behind the registry's back); {"op": "hold"} (print {"held": true}, wait for a line).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

CHUNK_TOKENS, OVERLAP, BATCH_CHUNKS = 32, 4, 3  # small: many chunks, several batches


def state(store) -> dict:
    from lmstack.docqa.store import CHUNKS

    live = {r.doc_id: r for r in store.documents()}
    ids: dict[tuple[str, str], list[int]] = {}
    rows = 0
    for row in store.iterate(CHUNKS, "", ["doc_id", "version", "chunk_id", "title", "headings"]):
        rows += 1
        ids.setdefault((row["doc_id"], row["version"]), []).append(int(row["chunk_id"]))
    docs = {
        doc_id: {
            "chunks": r.chunks,
            "hash": r.content_hash,
            "title": r.title,
            "live_ids": sorted(ids.get((doc_id, r.version), [])),
        }
        for doc_id, r in live.items()
    }
    return {"docs": docs, "rows": rows}


def run_steps(command: dict, embedder, tokenizer, out_path: str) -> None:
    from lmstack.docqa.ingest import Ingestor
    from lmstack.docqa.store import CHUNKS, DocStore

    if command.get("crash_at"):
        os.environ["LMSTACK_TEST_CRASH_AT"] = command["crash_at"]
    store = DocStore(command["store"])
    results = []
    for step in command["steps"]:
        op = step["op"]
        if op == "ingest":
            ingestor = Ingestor(store, embedder, tokenizer, CHUNK_TOKENS, OVERLAP, BATCH_CHUNKS)
            paths = [Path(p) for p in step["paths"]]
            results.append(ingestor.ingest(paths, title_field=step.get("title_field")).as_json())
        elif op == "state":
            results.append(state(store))
        elif op == "gc":
            results.append(store.collect_garbage(min_age_s=step["min_age_s"]))
        elif op == "drop":
            record = store.get(step["doc_id"])
            doc_id, version = json.dumps(record.doc_id), json.dumps(record.version)
            where = f"doc_id == {doc_id} and version == {version}"
            store.client.delete(CHUNKS, filter=where)
            store.flush()
            results.append(record.chunks)
        elif op == "hold":
            print(json.dumps({"held": True}), flush=True)
            os.read(0, 1 << 16)  # the test writes a line when it is done
            results.append(True)
        Path(out_path).write_text(json.dumps(results))  # after every step: a crash keeps some


def main() -> None:
    # One thread: an OpenMP team started before a fork deadlocks the child's first parallel op.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from milvus_lite import server_manager_instance

    from lmstack.embed import Embedder
    from lmstack.model.tokenizer import Tokenizer
    from lmstack.model.weights import resolve_model

    embedder = Embedder.shared()
    embedder.embed(["warm up"])
    tokenizer = Tokenizer(resolve_model(None))
    print(json.dumps({"ready": True}), flush=True)
    for line in iter(sys.stdin.buffer.readline, b""):
        command = json.loads(line)
        fd, out_path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_steps(command, embedder, tokenizer, out_path)
                server_manager_instance.release_all()
            except BaseException as exc:  # reported to the test, not a traceback lost here
                Path(out_path + ".err").write_text(f"{type(exc).__name__}: {exc}")
                code = 1
            sys.stdout.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        text = Path(out_path).read_text()
        err = Path(out_path + ".err")
        reply = {"status": code, "results": json.loads(text) if text else []}
        if err.exists():
            reply["error"] = err.read_text()
            err.unlink()
        os.unlink(out_path)
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
