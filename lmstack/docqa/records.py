"""What the document store holds and returns: document records, chunk rows, search hits."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

# Milvus VARCHAR max_length counts bytes of UTF-8 (Milvus Lite counts characters, a server
# bytes): every stored string is cut to these in bytes, never inside a code point.
MAX_META_BYTES = 1024  # doc_id, title
MAX_HEADINGS_BYTES = 2 * MAX_META_BYTES  # the heading path, as JSON
MAX_SOURCE_BYTES = 4 * MAX_META_BYTES
_MAX_HEADING_BYTES = 256  # one heading within the path


@dataclass
class DocumentRecord:
    doc_id: str
    title: str
    source: str
    content_hash: str
    version: str
    chunks: int
    tokens: int
    added_at: float = field(default_factory=time.time)


@dataclass
class ChunkRow:
    doc_id: str
    chunk_id: int
    title: str
    page: int | None
    headings: list[str]
    text: str
    tokens: int


@dataclass
class Hit(ChunkRow):
    """A retrieved chunk: the stored row plus how it ranked."""

    score: float
    rank: int = 0
    scores: dict = field(default_factory=dict)  # per retriever: {"dense": .., "bm25": ..}

    def as_json(self) -> dict:
        return {
            "doc_id": self.doc_id,
            "chunk_id": self.chunk_id,
            "title": self.title,
            "page": self.page,
            "score": round(self.score, 6),
            "text": self.text,
        }


def search_text_of(chunk: ChunkRow) -> str:
    """The text retrievers see: title and heading path, then the chunk."""
    parts = [chunk.title] if chunk.title else []
    parts += [h for h in chunk.headings if h and h != chunk.title]
    return f"{' > '.join(parts)}\n{chunk.text}" if parts else chunk.text


def hit_from_entity(entity: dict, score: float, key: str) -> Hit:
    """A Hit from a Milvus result entity (missing page stored as -1; headings as JSON)."""
    page = entity.get("page", -1)
    try:
        headings = json.loads(entity.get("headings") or "[]")
    except json.JSONDecodeError:
        headings = []
    return Hit(
        doc_id=entity["doc_id"],
        chunk_id=int(entity["chunk_id"]),
        title=entity.get("title", ""),
        page=None if page is None or page < 0 else int(page),
        headings=headings,
        text=entity["text"],
        tokens=int(entity.get("tokens", 0)),
        score=score,
        scores={key: score},
    )


def clip_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, at a code point boundary."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    # A cut inside a multi-byte sequence leaves an incomplete tail: "ignore" drops just it.
    return data[:limit].decode("utf-8", errors="ignore")


def storable_id(doc_id: str) -> str:
    """A doc_id that fits the store: itself when short enough, else a clipped prefix plus a
    hash of the whole id, so two long ids that share a prefix stay two documents."""
    if len(doc_id.encode("utf-8")) <= MAX_META_BYTES:
        return doc_id
    digest = hashlib.sha256(doc_id.encode("utf-8")).hexdigest()[:16]
    return f"{clip_utf8(doc_id, MAX_META_BYTES - len(digest) - 1)}~{digest}"


def headings_json(headings: list[str]) -> str:
    """The heading path as JSON within MAX_HEADINGS_BYTES: each heading clipped, then the
    deepest dropped until it fits (the stored value stays valid JSON)."""
    path = [clip_utf8(h, _MAX_HEADING_BYTES) for h in headings]
    while True:
        text = json.dumps(path, ensure_ascii=False)
        if len(text.encode("utf-8")) <= MAX_HEADINGS_BYTES or not path:
            return text
        path.pop()
