"""Token-aware chunking: split at headings, paragraphs and sentences first, tokens last.

A chunk never exceeds `max_tokens` tokens of the serving model's tokenizer, whatever the
input (a 10,000-character line, a table, text with no spaces): units that are still too
long after sentence splitting are cut on token boundaries. Consecutive chunks of a section
share about `overlap` tokens of whole units so a fact cut at a boundary is still retrievable.
Each chunk keeps the heading path (Markdown `#` headings) and page it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmstack.errors import InputError

HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


@dataclass
class Chunk:
    doc_id: str
    chunk_id: int
    text: str
    tokens: int
    page: int | None = None
    headings: list[str] = field(default_factory=list)

    @property
    def heading_path(self) -> str:
        return " > ".join(self.headings)


@dataclass
class _Unit:
    text: str
    tokens: int
    headings: list[str]
    page: int | None


def _sections(text: str, headings: list[str]):
    """(heading path, paragraph) pairs. A heading updates the path and also opens the next
    paragraph: in glossaries and FAQs the heading is the term being defined."""
    path = list(headings)
    paragraph: list[str] = []
    for line in text.splitlines():
        match = HEADING.match(line)
        if match or not line.strip():
            if paragraph:
                yield list(path), "\n".join(paragraph)
                paragraph = []
            if match:
                level = len(match.group(1))
                path = path[: level - 1] + [match.group(2)]
                paragraph = [line.strip()]
            continue
        paragraph.append(line)
    if paragraph:
        yield list(path), "\n".join(paragraph)
    headings[:] = path  # the path carries over to the next page


def _units(tokenizer, pages: list[tuple[int | None, str]], max_tokens: int) -> list[_Unit]:
    units: list[_Unit] = []
    headings: list[str] = []
    for page, text in pages:
        for path, paragraph in _sections(text, headings):
            n = len(tokenizer.encode(paragraph))
            pieces = [paragraph] if n <= max_tokens else SENTENCE_END.split(paragraph)
            for piece in pieces:
                ids = tokenizer.encode(piece)
                if len(ids) <= max_tokens:
                    units.append(_Unit(piece, len(ids), path, page))
                    continue
                # No sentence boundary helps (a huge line, a table, no spaces): cut on tokens.
                start = 0
                while start < len(ids):
                    end = min(start + max_tokens, len(ids))
                    while True:  # decoded text can re-encode longer at a cut: shrink until it fits
                        text_part = tokenizer.decode(ids[start:end])
                        count = len(tokenizer.encode(text_part))
                        if count <= max_tokens or end - start <= 1:
                            break
                        end -= max(1, count - max_tokens)
                    units.append(_Unit(text_part, count, path, page))
                    start = end
    return units


def chunk_pages(
    doc_id: str,
    pages: list[tuple[int | None, str]],
    tokenizer,
    max_tokens: int = 500,
    overlap: int = 50,
) -> list[Chunk]:
    """Chunks of a document given as (page number or None, text) pairs, in order."""
    if max_tokens < 16:
        raise InputError(f"chunk size must be at least 16 tokens, got {max_tokens}")
    if not 0 <= overlap < max_tokens // 2:
        raise InputError(f"overlap must be in [0, {max_tokens // 2}), got {overlap}")
    chunks: list[Chunk] = []
    current: list[_Unit] = []

    def size(units: list[_Unit]) -> int:
        # Units are joined with blank lines; re-count exactly so the limit always holds.
        return len(tokenizer.encode("\n\n".join(u.text for u in units)))

    def emit() -> None:
        text = "\n\n".join(u.text for u in current)
        first = current[0]
        chunks.append(Chunk(doc_id, len(chunks), text, size(current), first.page, first.headings))

    for unit in _units(tokenizer, pages, max_tokens):
        # A chunk stays within one page (so a citation names the page exactly) and one
        # top-level section.
        same_place = (
            unit.headings[:1] == current[0].headings[:1] and unit.page == current[0].page
            if current
            else True
        )
        if current and (not same_place or size([*current, unit]) > max_tokens):
            emit()
            # Carry whole trailing units (up to `overlap` tokens) into the next chunk,
            # but never across a page or top-level section change.
            carried: list[_Unit] = []
            if same_place:
                for previous in reversed(current):
                    if sum(u.tokens for u in carried) + previous.tokens > overlap:
                        break
                    carried.insert(0, previous)
            current = carried if size([*carried, unit]) <= max_tokens else []
        current.append(unit)
    if current:
        emit()
    return chunks
