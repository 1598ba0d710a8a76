"""The document store: chunks with dense vectors and Milvus' built-in BM25, in Milvus.

`DocStore("./lmstack-docs.db")` is a Milvus Lite file (no server); `DocStore("milvus://host:
19530")` (or `http://host:19530`) is a Milvus server or cluster, through the same client
calls. Two collections:

- `lmstack_chunks`: one row per chunk: text (analysed for BM25: lowercase, English stop
  words, stemming), the sparse BM25 vector Milvus computes from it, the 384-d dense vector,
  and metadata (doc_id, chunk_id, title, page, headings, tokens, version).
- `lmstack_documents`: the registry: one row per document with its content hash and the
  `version` of its chunks that is live.

Why versions: replacing a document writes its new chunks under a new version, flushes them,
then switches the registry row (one upsert), then deletes that document's old version. A
crash at any point leaves either the previous version live or the new one, each with all
its chunks; orphaned chunks of an unfinished version are never returned (searches keep
only live versions) and are deleted by a later write once they are old (versions.py).
A document whose live chunks are missing or short is re-ingested, never "unchanged".

Several writers: garbage collection re-reads the registry right before it deletes and
spares young versions, and a write deletes only (document, version) pairs it replaced, so
two writers on one store never delete each other's documents. With Milvus Lite they can
only take turns: the file is locked by the first process that opens it, until that process
exits (a running `lmstack serve` holds it once a document request opened it), and another
process gets an error that says so. Writers on a Milvus server may run at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from lmstack.docqa.records import (
    MAX_META_BYTES,
    MAX_SOURCE_BYTES,
    ChunkRow,
    DocumentRecord,
    Hit,
    clip_utf8,
    headings_json,
    hit_from_entity,
    search_text_of,
    storable_id,
)
from lmstack.docqa.schema import CHUNKS, DOCUMENTS, MAX_TEXT_BYTES, ensure_collections
from lmstack.docqa.versions import (
    GC_MIN_AGE_S,
    checkpoint,
    locked_elsewhere,
    new_version,
    version_age,
)
from lmstack.errors import InputError, LmstackError

DEFAULT_STORE = "./lmstack-docs.db"
_OUTPUT = ["doc_id", "chunk_id", "title", "page", "headings", "text", "tokens", "version"]
# Over-fetch so that dropping stale (not live) rows still leaves top_k results.
_OVERFETCH = 2
# Searches filter by the registry's live versions, re-read this often so that documents
# another writer added or replaced show up (and their old chunks stop being expected).
_LIVE_TTL_S = 5.0


_RECORD_FIELDS = list(DocumentRecord.__dataclass_fields__)


def _record(row: dict) -> DocumentRecord:
    return DocumentRecord(**{k: row[k] for k in _RECORD_FIELDS})


def _literal(value) -> str:
    """A Milvus filter literal (strings and lists of strings, escaped)."""
    return json.dumps(value, ensure_ascii=False)


def resolve_uri(store: str | os.PathLike) -> tuple[str, bool]:
    """(client uri, is_local_file) for a --store value."""
    text = str(store)
    if text.startswith("milvus://"):
        return "http://" + text[len("milvus://") :], False
    if text.startswith(("http://", "https://", "tcp://")):
        return text, False
    path = Path(text).expanduser().resolve()
    if path.suffix != ".db":
        raise InputError(f"--store {text}: a Milvus Lite store's name ends in .db")
    # Milvus Lite 3 keeps a store as a folder (LOCK, collections/, databases/).
    if path.is_file() or (
        path.is_dir() and any(path.iterdir()) and not (path / "collections").is_dir()
    ):
        raise InputError(f"--store {text} exists and is not a Milvus Lite store")
    return str(path), True


class DocStore:
    def __init__(self, store: str | os.PathLike = DEFAULT_STORE, dimension: int = 384):
        # gRPC (under pymilvus) logs keepalive chatter from its C core to stderr.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        from pymilvus import MilvusClient

        logging.getLogger("pymilvus").setLevel(logging.ERROR)
        self.uri, self.local = resolve_uri(store)
        self.dimension = dimension
        if self.local:
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MilvusClient(self.uri)
        except Exception as exc:
            if self.local and locked_elsewhere(self.uri):
                raise LmstackError(
                    f"the document store {store} is open in another process (a running "
                    "`lmstack serve` or `lmstack docs add`); Milvus Lite lets one process use "
                    "a store at a time: stop that process, use another --store, or keep the "
                    "store on a Milvus server (--store milvus://host:19530)"
                ) from exc
            raise LmstackError(f"cannot open the document store {store}: {exc}") from exc
        self._ensure_collections()
        self._live: dict[str, str] | None = None  # doc_id -> live version
        self._live_at = 0.0

    # ---------------------------------------------------------------- schema

    def _ensure_collections(self) -> None:
        ensure_collections(self.client, self.uri, self.dimension)

    # ---------------------------------------------------------------- registry

    def iterate(self, collection: str, filter: str, fields: list[str]):
        iterator = self.client.query_iterator(
            collection, batch_size=2000, filter=filter, output_fields=fields
        )
        try:
            while True:
                batch = iterator.next()
                if not batch:
                    return
                yield from batch
        finally:
            iterator.close()

    def documents(self) -> list[DocumentRecord]:
        rows = [_record(row) for row in self.iterate(DOCUMENTS, "", _RECORD_FIELDS)]
        return sorted(rows, key=lambda r: r.doc_id)

    def get(self, doc_id: str) -> DocumentRecord | None:
        rows = self.client.query(
            DOCUMENTS,
            filter=f"doc_id == {_literal(storable_id(doc_id))}",
            output_fields=_RECORD_FIELDS,
        )
        return _record(rows[0]) if rows else None

    def _registry_versions(self) -> dict[str, str]:
        """doc_id -> live version, read from the registry now (never cached)."""
        return {
            row["doc_id"]: row["version"]
            for row in self.iterate(DOCUMENTS, "", ["doc_id", "version"])
        }

    def live_versions(self) -> dict[str, str]:
        """doc_id -> live version, for filtering search results (re-read every few seconds)."""
        if self._live is None or time.monotonic() - self._live_at > _LIVE_TTL_S:
            self._live = self._registry_versions()
            self._live_at = time.monotonic()
        return self._live

    def count_chunks(self) -> int:
        return sum(r.chunks for r in self.documents())

    def chunk_counts(self) -> dict[tuple[str, str], int]:
        """(doc_id, version) -> chunk rows stored, over the whole chunk collection."""
        counts: dict[tuple[str, str], int] = {}
        for row in self.iterate(CHUNKS, "", ["doc_id", "version"]):
            key = (row["doc_id"], row["version"])
            counts[key] = counts.get(key, 0) + 1
        return counts

    # ---------------------------------------------------------------- writes

    def replace(self, batch: list[tuple[DocumentRecord, list[ChunkRow], object]]) -> None:
        """Make each document's chunks its live content, atomically for readers.

        `batch` is (record, chunks, vectors) per document. The chunks of the whole batch go
        in under one new version and are flushed, the registry rows switch to it in one
        upsert, then each document's replaced version is deleted: a few calls per batch, not
        per document (a JSONL corpus of 10,000 one-chunk records would otherwise make 30,000
        round trips). A crash before the upsert leaves the old versions live (the new
        chunks are orphans); after it, the new ones, with every chunk already durable.
        """
        version = new_version()
        rows, registry = [], []
        stale: dict[str, list[str]] = {}  # replaced version -> the doc_ids it held
        for index, (record, chunks, vectors) in enumerate(batch):
            if len(chunks) != len(vectors):
                raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
            for chunk, vector in zip(chunks, vectors):
                rows.append(self._row(chunk, vector, version, f"{version}-{index}"))
            record.doc_id = storable_id(record.doc_id)
            if record.version:  # the version this document had until now
                stale.setdefault(record.version, []).append(record.doc_id)
            record.version = version
            record.chunks = len(chunks)
            registry.append(
                {
                    "doc_id": record.doc_id,
                    "title": clip_utf8(record.title, MAX_META_BYTES),
                    "source": clip_utf8(record.source, MAX_SOURCE_BYTES),
                    "content_hash": record.content_hash,
                    "version": version,
                    "chunks": record.chunks,
                    "tokens": record.tokens,
                    "added_at": record.added_at,
                    "unused": [0.0, 0.0],
                }
            )
        for start in range(0, len(rows), 1000):
            self.client.insert(CHUNKS, rows[start : start + 1000])
        checkpoint("after_chunks")
        self.client.flush(CHUNKS)  # durable before any registry row names them
        checkpoint("after_flush")
        for start in range(0, len(registry), 1000):
            self.client.upsert(DOCUMENTS, registry[start : start + 1000])
        checkpoint("after_registry")
        self._delete_pairs(stale)  # only the (document, version) pairs replaced here
        checkpoint("after_delete")
        if self._live is not None:
            for record, _, _ in batch:
                self._live[record.doc_id] = version

    def _row(self, chunk: ChunkRow, vector, version: str, key: str) -> dict:
        search_text = search_text_of(chunk)
        if len(search_text.encode()) > MAX_TEXT_BYTES:  # the chunker keeps far below this
            raise InputError(
                f"chunk {chunk.chunk_id} of {chunk.doc_id} is "
                f"{len(search_text.encode())} bytes, over the store's {MAX_TEXT_BYTES}"
            )
        return {
            "pk": f"{key}-{chunk.chunk_id}",
            "doc_id": storable_id(chunk.doc_id),
            "chunk_id": chunk.chunk_id,
            "version": version,
            "title": clip_utf8(chunk.title, MAX_META_BYTES),
            "page": -1 if chunk.page is None else int(chunk.page),
            "headings": headings_json(chunk.headings),
            "tokens": chunk.tokens,
            "text": chunk.text,
            "search_text": search_text,
            "dense": [float(x) for x in vector],
        }

    def remove(self, doc_id: str) -> DocumentRecord:
        doc_id = storable_id(doc_id)
        record = self.get(doc_id)
        if record is None:
            known = [r.doc_id for r in self.documents()][:10]
            raise InputError(f"no document {doc_id!r} in {self.uri} (it holds {known} ...)")
        self.client.delete(DOCUMENTS, filter=f"doc_id == {_literal(doc_id)}")
        self.client.delete(CHUNKS, filter=f"doc_id == {_literal(doc_id)}")
        if self._live is not None:
            self._live.pop(doc_id, None)
        self.flush()
        return record

    def collect_garbage(
        self,
        counts: dict[tuple[str, str], int] | None = None,
        min_age_s: float = GC_MIN_AGE_S,
    ) -> int:
        """Delete chunks that no registry row names (an interrupted ingestion, a replaced
        version a crashed writer did not delete); returns how many (document, version)
        pairs went.

        The registry is read after the chunks and right before deleting, so a version that
        went live meanwhile is kept; versions younger than `min_age_s` are kept too, as some
        writer may be about to name them. `counts` is chunk_counts() when the caller has it.
        """
        counts = self.chunk_counts() if counts is None else counts
        live = self._registry_versions()
        stale: dict[str, list[str]] = {}
        for doc_id, version in counts:
            if live.get(doc_id) != version and version_age(version) >= min_age_s:
                stale.setdefault(version, []).append(doc_id)
        if stale:
            self._delete_pairs(stale)
            self.flush()
        return sum(len(ids) for ids in stale.values())

    def _delete_pairs(self, pairs: dict[str, list[str]]) -> None:
        """Delete the chunks of these documents in these versions (version -> doc_ids).

        Versions are shared by a batch: never delete a whole version, which other documents
        may still have live."""
        for version, doc_ids in sorted(pairs.items()):
            for start in range(0, len(doc_ids), 1000):
                names = _literal(sorted(doc_ids[start : start + 1000]))
                where = f"version == {_literal(version)} and doc_id in {names}"
                self.client.delete(CHUNKS, filter=where)

    def flush(self) -> None:
        # Sealing segments builds their indexes: searches over unflushed rows are brute
        # force (1.4 s instead of 23 ms for BM25 over 10,000 chunks, measured).
        self.client.flush(CHUNKS)
        self.client.flush(DOCUMENTS)

    # ---------------------------------------------------------------- reads

    def _hits(self, results, key: str, top_k: int, bm25: bool = False) -> list[Hit]:
        live = self.live_versions()
        hits: list[Hit] = []
        for row in results[0] if results else []:
            entity = row["entity"]
            if live.get(entity["doc_id"]) != entity["version"]:
                continue  # an unfinished or replaced version
            # Milvus Lite reports BM25 scores negated (as a distance); servers do not.
            score = abs(row["distance"]) if bm25 else float(row["distance"])
            hits.append(hit_from_entity(entity, score, key))
            if len(hits) == top_k:
                break
        for rank, hit in enumerate(hits, start=1):
            hit.rank = rank
        return hits

    def search_dense(self, vector, top_k: int) -> list[Hit]:
        results = self.client.search(
            CHUNKS,
            data=[[float(x) for x in vector]],
            anns_field="dense",
            limit=top_k * _OVERFETCH,
            output_fields=_OUTPUT,
            search_params={"metric_type": "COSINE"},
        )
        return self._hits(results, "dense", top_k)

    def search_bm25(self, query: str, top_k: int) -> list[Hit]:
        results = self.client.search(
            CHUNKS,
            data=[query],
            anns_field="sparse",
            limit=top_k * _OVERFETCH,
            output_fields=_OUTPUT,
            search_params={"metric_type": "BM25"},
        )
        return self._hits(results, "bm25", top_k, bm25=True)

    def chunks_of(self, doc_id: str) -> list[Hit]:
        """All live chunks of one document, in order (for strategies that read it whole)."""
        doc_id = storable_id(doc_id)
        version = self.live_versions().get(doc_id)
        if version is None:
            raise InputError(f"no document {doc_id!r} in {self.uri}")
        rows = list(
            self.iterate(
                CHUNKS,
                f"doc_id == {_literal(doc_id)} and version == {_literal(version)}",
                _OUTPUT,
            )
        )
        return [
            hit_from_entity(row, 0.0, "order") for row in sorted(rows, key=lambda r: r["chunk_id"])
        ]

    def close(self) -> None:
        self.client.close()
