"""What the document store holds and returns: document records, chunk rows, search hits."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field


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
