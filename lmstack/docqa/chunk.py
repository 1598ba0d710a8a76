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


def heading(line: str) -> tuple[int, str] | None:
    """(level, title) of a Markdown ATX heading line, else None, in one pass over the line.

    What `^(#{1,6})\\s+(.+?)\\s*#*\\s*$` matches, without its backtracking (cubic in the
    spaces of "# a<4,000 spaces>b"): one to six '#', whitespace, then the title with the
    closing '#'s and surrounding whitespace dropped (never empty: at least one character).
    """
    level = len(line) - len(line.lstrip("#"))
    if not 1 <= level <= 6 or len(line) == level or not line[level].isspace():
        return None
    rest = line[level:]
    body = rest.lstrip()
    if not body:  # only whitespace after the '#'s: the pattern's title is its last character
        return (level, rest[-1]) if len(rest) >= 2 else None
    title = body.rstrip().rstrip("#").rstrip()
    return level, title or body[0]


def _sections(text: str, headings: list[str]):
    """(heading path, paragraph) pairs. A heading updates the path and also opens the next
    paragraph: in glossaries and FAQs the heading is the term being defined."""
    path = list(headings)
    paragraph: list[str] = []
    for line in text.splitlines():
        found = heading(line)
        if found or not line.strip():
            if paragraph:
                yield list(path), "\n".join(paragraph)
                paragraph = []
            if found:
                level, title = found
                path = path[: level - 1] + [title]
                paragraph = [line.strip()]
            continue
        paragraph.append(line)
    if paragraph:
        yield list(path), "\n".join(paragraph)
    headings[:] = path  # the path carries over to the next page


def _units(encode, decode, pages: list[tuple[int | None, str]], max_tokens: int) -> list[_Unit]:
    units: list[_Unit] = []
    headings: list[str] = []
    seen: dict[str, list[int]] = {}  # short paragraphs and sentences recur (list items, "Yes.")

    def encode_short(text: str) -> list[int]:
        if len(text) > 64:
            return encode(text)
        ids = seen.get(text)
        if ids is None:
            ids = seen[text] = encode(text)
        return ids

    for page, text in pages:
        for path, paragraph in _sections(text, headings):
            paragraph_ids = encode_short(paragraph)
            pieces = [paragraph]
            if len(paragraph_ids) > max_tokens:
                pieces = SENTENCE_END.split(paragraph)
            for piece in pieces:
                ids = paragraph_ids if len(pieces) == 1 else encode_short(piece)
                if len(ids) <= max_tokens:
                    units.append(_Unit(piece, len(ids), path, page))
                    continue
                # No sentence boundary helps (a huge line, a table, no spaces): cut on tokens.
                start = 0
                while start < len(ids):
                    end = min(start + max_tokens, len(ids))
                    while True:  # decoded text can re-encode longer at a cut: shrink until it fits
                        text_part = decode(ids[start:end])
                        count = len(encode(text_part))
                        if count <= max_tokens or end - start <= 1:
                            break
                        end -= max(1, count - max_tokens)
                    units.append(_Unit(text_part, count, path, page))
                    start = end
    return units


def _edge_slack(left: str, right: str) -> int:
    """How far joining `left` and `right` with a blank line can move the token count from
    the sum of the parts: 0 between non-space characters (byte-level BPE splits the text at
    whitespace first, so nothing merges across "\n\n"), else the bytes of the whitespace
    that meets there, plus one."""
    if not (left[-1:].isspace() or right[:1].isspace()):
        return 0
    edge = (left[len(left.rstrip()) :] + right[: len(right) - len(right.lstrip())]).encode()
    return len(edge) + 1


def chunk_pages(
    doc_id: str,
    pages: list[tuple[int | None, str]],
    tokenizer,
    max_tokens: int = 500,
    overlap: int = 50,
) -> list[Chunk]:
    """Chunks of a document given as (page number or None, text) pairs, in order.

    Text is counted as it will be encoded in a prompt (`encode_plain`: a document cannot
    spell a control token). Whether the next unit fits is first bounded from the parts'
    counts (`_edge_slack`) and counted exactly only near the limit, so a page of a
    thousand tiny sentences costs a few passes of the tokenizer, not one per sentence;
    every chunk's count is exact and never above `max_tokens`."""
    if max_tokens < 16:
        raise InputError(f"chunk size must be at least 16 tokens, got {max_tokens}")
    if not 0 <= overlap < max_tokens // 2:
        raise InputError(f"overlap must be in [0, {max_tokens // 2}), got {overlap}")
    encode = getattr(tokenizer, "encode_plain", tokenizer.encode)
    join_cost = len(encode("a\n\nb")) - len(encode("a")) - len(encode("b"))
    units = _units(encode, tokenizer.decode, pages, max_tokens)
    chunks: list[Chunk] = []
    current: list[_Unit] = []
    bound, exact, verify = 0, True, False  # bound >= tokens of current (== when exact)
    i = 0  # units[i] is the next unit to place

    def size(units: list[_Unit]) -> int:
        # Units are joined with blank lines; re-count exactly so the limit always holds.
        return len(encode("\n\n".join(u.text for u in units)))

    def settle() -> bool:
        """Count `current` exactly; False if an estimate let it overflow, in which case its
        last units go back to be placed again, counted exactly this time."""
        nonlocal bound, exact, verify, i
        if not exact:
            bound, exact = size(current), True
        if bound <= max_tokens:
            return True
        while len(current) > 1 and bound > max_tokens:  # a tokenizer that merges at joins
            current.pop()
            i -= 1
            bound = size(current)
        verify = True
        return False

    while i < len(units) or current:
        if i == len(units):  # the last chunk
            if settle():
                first = current[0]
                chunks.append(
                    Chunk(doc_id, len(chunks), "\n\n".join(u.text for u in current), bound,
                          first.page, first.headings)
                )  # fmt: skip
                current = []
            continue
        unit = units[i]
        if not current:
            current, bound, exact = [unit], unit.tokens, True
            i += 1
            continue
        # A chunk stays within one page (so a citation names the page exactly) and one
        # top-level section.
        same_place = unit.headings[:1] == current[0].headings[:1] and unit.page == current[0].page
        if same_place:
            slack = _edge_slack(current[-1].text, unit.text)
            add = join_cost + unit.tokens
            if not verify and bound + add + slack <= max_tokens:  # fits for sure
                current.append(unit)
                bound, exact = bound + add + slack, False
                i += 1
                continue
            if not settle():
                continue
            if bound + add - slack <= max_tokens:  # may fit: count it
                joined = size([*current, unit])
                if joined <= max_tokens:
                    current.append(unit)
                    bound = joined
                    i += 1
                    continue
        elif not settle():
            continue
        first = current[0]
        text = "\n\n".join(u.text for u in current)
        chunks.append(Chunk(doc_id, len(chunks), text, bound, first.page, first.headings))
        # Carry whole trailing units (up to `overlap` tokens) into the next chunk,
        # but never across a page or top-level section change.
        carried: list[_Unit] = []
        if same_place:
            for previous in reversed(current):
                if sum(u.tokens for u in carried) + previous.tokens > overlap:
                    break
                carried.insert(0, previous)
        verify = False
        current, bound, exact = [unit], unit.tokens, True
        if carried:
            estimate = sum(u.tokens + join_cost for u in carried) + unit.tokens
            estimate += sum(_edge_slack(a.text, b.text) for a, b in zip(carried, carried[1:]))
            estimate += _edge_slack(carried[-1].text, unit.text)
            if estimate <= max_tokens:
                current, bound, exact = [*carried, unit], estimate, False
            elif (joined := size([*carried, unit])) <= max_tokens:
                current, bound = [*carried, unit], joined
        i += 1
    return chunks
