"""Ingestion: read -> chunk -> embed -> store, per document, idempotent by content hash.

Unchanged documents (same doc_id, same content hash, every live chunk present) are skipped
without embedding; changed ones, and ones whose chunks are missing or short (a crash, a lost
write), replace their chunks atomically (see store.py). Ids too long for the store are
shortened with a hash of the whole id (records.storable_id), so they still match next time.
A file that cannot be read is reported and the rest of the batch is still ingested; what a
readable file lacks (a PDF page with no text layer) is reported as a warning. Chunks of
several small documents are embedded together so a JSONL corpus of short records still runs
in full batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.docqa.chunk import chunk_pages
from lmstack.docqa.documents import Document, expand, read_path
from lmstack.docqa.records import ChunkRow, DocumentRecord, search_text_of, storable_id
from lmstack.docqa.store import DocStore
from lmstack.docqa.versions import checkpoint
from lmstack.errors import InputError

_EMBED_BATCH_CHUNKS = 256  # documents are buffered until this many chunks await embedding


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped_lines: list[tuple[str, str]] = field(default_factory=list)  # (path, "N (why)")
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, message)
    chunks: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def documents(self) -> int:
        return len(self.added) + len(self.replaced)

    def as_json(self) -> dict:
        return {
            "added": self.added,
            "replaced": self.replaced,
            "unchanged": self.unchanged,
            "failed": [{"path": p, "error": e} for p, e in self.failed],
            "skipped_lines": [{"path": p, "line": e} for p, e in self.skipped_lines],
            "warnings": [{"path": p, "warning": w} for p, w in self.warnings],
            "documents": self.documents,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
        }


class Ingestor:
    def __init__(
        self,
        store: DocStore,
        embedder,
        tokenizer,
        chunk_tokens: int = 500,
        overlap: int = 50,
        batch_chunks: int = _EMBED_BATCH_CHUNKS,
    ):
        if chunk_tokens < 16:
            raise InputError(f"--chunk-tokens must be at least 16, got {chunk_tokens}")
        self.store = store
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.batch_chunks = batch_chunks  # chunks per embedding batch and per store write
        # Part of each document's stored hash: re-adding with other chunking or another
        # embedder re-indexes instead of being skipped as unchanged.
        self.settings = f"chunk={chunk_tokens},overlap={overlap},embedder={embedder.name}"

    def ingest(
        self,
        paths: list[Path],
        text_field: str = "text",
        id_field: str = "id",
        title_field: str | None = None,
        progress=None,
        pdf_password: str | None = None,
    ) -> IngestReport:
        """Add or update everything under `paths`; `progress(kind, n)` reports work done.

        `pdf_password` opens encrypted PDFs that the empty password does not; it is passed
        to the reader only, never stored or reported."""
        start = time.perf_counter()
        report = IngestReport()
        counts = self.store.chunk_counts()
        self.store.collect_garbage(counts)  # chunks of an ingestion interrupted earlier
        checkpoint("after_gc")
        known = {r.doc_id: r for r in self.store.documents()}
        files = []
        for path in paths:
            if not path.exists():
                report.failed.append((str(path), "no such file or directory"))
            else:
                files += expand([path])
        if progress:
            progress("files_total", len(files))
        pending: list[tuple[Document, list[ChunkRow], DocumentRecord | None]] = []
        seen: dict[str, str] = {}  # doc_id -> source, for this run
        for path in files:
            try:
                docs = read_path(
                    path,
                    pdf_password,
                    text_field=text_field,
                    id_field=id_field,
                    title_field=title_field,
                )
            except InputError as exc:
                report.failed.append((str(path), str(exc)))
                if progress:
                    progress("files", 1)
                continue
            for doc in docs:
                doc.doc_id = storable_id(doc.doc_id)
                report.skipped_lines += [(str(path), line) for line in doc.skipped_lines]
                report.warnings += [(str(path), warning) for warning in doc.warnings]
                if doc.doc_id in seen:
                    report.failed.append(
                        (str(path), f"doc_id {doc.doc_id!r} also comes from {seen[doc.doc_id]}")
                    )
                    continue
                seen[doc.doc_id] = doc.source
                previous = known.get(doc.doc_id)
                fingerprint = f"{doc.content_hash}:{self.settings}"
                if (
                    previous is not None
                    and previous.content_hash == fingerprint
                    and counts.get((previous.doc_id, previous.version), 0) == previous.chunks
                ):
                    report.unchanged.append(doc.doc_id)
                    continue
                rows = self._chunk(doc)
                if not rows:
                    report.failed.append((str(path), f"{doc.doc_id}: no text to index"))
                    continue
                pending.append((doc, rows, previous))
                if sum(len(r) for _, r, _ in pending) >= self.batch_chunks:
                    self._write(pending, report, progress)
                    pending = []
            if progress:
                progress("files", 1)
        if pending:
            self._write(pending, report, progress)
        if report.documents:
            self.store.flush()
        report.seconds = time.perf_counter() - start
        return report

    def _chunk(self, doc: Document) -> list[ChunkRow]:
        chunks = chunk_pages(
            doc.doc_id, doc.pages, self.tokenizer, max_tokens=self.chunk_tokens,
            overlap=self.overlap,
        )  # fmt: skip
        return [
            ChunkRow(doc.doc_id, c.chunk_id, doc.title, c.page, c.headings, c.text, c.tokens)
            for c in chunks
            if c.text.strip()
        ]

    def _write(self, pending, report: IngestReport, progress) -> None:
        texts = [search_text_of(row) for _, rows, _ in pending for row in rows]
        vectors = self.embedder.embed(
            texts, progress=(lambda n: progress("chunks", n)) if progress else None
        )
        batch, offset = [], 0
        for doc, rows, previous in pending:
            record = DocumentRecord(
                doc_id=doc.doc_id,
                title=doc.title,
                source=doc.source,
                content_hash=f"{doc.content_hash}:{self.settings}",
                version=previous.version if previous else "",
                chunks=len(rows),
                tokens=sum(r.tokens for r in rows),
            )
            batch.append((record, rows, vectors[offset : offset + len(rows)]))
            offset += len(rows)
        self.store.replace(batch)
        checkpoint("after_batch")
        for (record, rows, _), (_, _, previous) in zip(batch, pending):
            (report.replaced if previous else report.added).append(record.doc_id)
            report.chunks += len(rows)
            report.tokens += record.tokens
