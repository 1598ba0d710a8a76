"""Reading documents: PDF (pages kept), Markdown, HTML, plain text and JSONL corpora.

Every reader returns `Document`s whose text is a list of (page, text) pairs, the shape the
chunker takes. Bad files raise InputError naming the file and what is wrong; a JSONL
corpus skips malformed lines and reports their numbers instead of failing the batch.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from lmstack.errors import InputError

TEXT_SUFFIXES = {".txt", ".text", ".rst", ".log"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}


@dataclass
class Document:
    doc_id: str
    title: str
    pages: list[tuple[int | None, str]]
    source: str
    content_hash: str = ""
    skipped_lines: list[str] = field(default_factory=list)  # JSONL only: "N (why)"

    def __post_init__(self) -> None:
        if not self.content_hash:
            digest = hashlib.sha256()
            for page, text in self.pages:
                digest.update(f"{page}\x00{text}\x00".encode())
            self.content_hash = digest.hexdigest()


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: the file is empty")
    if b"\x00" in data[:4096]:
        raise InputError(f"{path}: looks like a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); convert it first"
        ) from None


def read_pdf(path: Path) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise InputError(f"{path}: the PDF is encrypted; decrypt it first")
        pages = [(i + 1, page.extract_text() or "") for i, page in enumerate(reader.pages)]
    except InputError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(f"{path}: not a readable PDF ({exc})") from None
    if not any(text.strip() for _, text in pages):
        raise InputError(f"{path}: the PDF has no extractable text (scanned images?)")
    title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    return Document(path.name, str(title or path.stem), pages, str(path))


_SECTION_NAME = re.compile(r"([a-zA-Z][-_.a-zA-Z0-9]*)\s*")  # _markupbase's name token
_SECTION_KEYWORDS = {"temp", "cdata", "ignore", "include", "rcdata", "if", "else", "endif"}


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; headings become Markdown headings for the chunker."""

    SKIP = {"script", "style", "noscript", "template"}
    BLOCK = {"p", "div", "li", "tr", "br", "section", "article", "table", "ul", "ol", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag == "title":
            self._in_title = True
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "title":
            self._in_title = False
        elif (len(tag) == 2 and tag[0] == "h") or tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data) -> None:
        if self._in_title:
            self.title += data
        elif not self.skipping:
            self.parts.append(data)

    def parse_marked_section(self, i, report=1):
        # "<![" without a known keyword after it ("<![<![", "<![x["): the standard library
        # raises AssertionError (slowly: it formats the text into the message); skip the
        # three characters as markup and read on.
        name = _SECTION_NAME.match(self.rawdata, i + 3)
        complete = name is not None and name.end() < len(self.rawdata)
        if name is None or complete and name.group(1).lower() not in _SECTION_KEYWORDS:
            return i + 3
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            return i + 3


def read_html(path: Path) -> Document:
    parser = _HTMLText()
    parser.feed(_read_utf8(path))
    text = "".join(parser.parts)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    text = "\n".join(lines)
    if not text.strip():
        raise InputError(f"{path}: the page has no visible text")
    return Document(path.name, parser.title.strip() or path.stem, [(None, text)], str(path))


# Markup in Markdown that carries no text: empty anchors, layout divs and spans, comments,
# line breaks. What `<(a|div|span)\b[^>]*>\s*</\1>|<!--.*?-->|<br\s*/?>` (re.S | re.I)
# removes, found by a scanner instead: the pattern rescans to the end of the text from
# every unterminated "<!--" or "<a", quadratic in a file of repeated openers.
_OPENER = re.compile(r"<(?:(a|div|span)(?!\w)|!--|br)", re.I)
_SPACE = re.compile(r"\s*")


def clean_markdown(text: str) -> str:
    return html.unescape(_strip_empty_markup(text))


def _strip_empty_markup(text: str) -> str:
    kept: list[str] = []
    pos = search_from = 0  # text[:pos] is decided; openers are looked for from search_from
    comments = True  # False once a "<!--" has no "-->" after it: no later one has either
    tag = (0, -2, 0)  # (from, first ">" at or after from or -1, end of the spaces after it)
    while (opener := _OPENER.search(text, search_from)) is not None:
        start, end = opener.span()
        removed_to = -1
        if opener.group(1) is not None:  # <a, <div, <span: attributes, ">", spaces, closer
            if not (tag[0] <= end and (tag[1] == -1 or tag[1] >= end)):
                gt = text.find(">", end)  # openers before this ">" reuse it: one scan in all
                tag = (end, gt, _SPACE.match(text, gt + 1).end() if gt >= 0 else -1)
            closer = _closer(opener.group(1)).match(text, tag[2]) if tag[1] >= 0 else None
            removed_to = closer.end() if closer else -1
        elif opener.group(0) == "<!--":
            close = text.find("-->", end) if comments else -1
            comments = close >= 0
            removed_to = close + 3 if comments else -1
        else:  # <br, optional spaces, optional "/", ">"
            after = _SPACE.match(text, end).end()
            after += text.startswith("/", after)
            removed_to = after + 1 if text.startswith(">", after) else -1
        if removed_to < 0:
            search_from = start + 1
            continue
        kept.append(text[pos:start])
        pos = search_from = removed_to
    kept.append(text[pos:])
    return "".join(kept)


@functools.cache
def _closer(name: str) -> re.Pattern:
    return re.compile(f"</{re.escape(name)}>", re.I)


def read_text(path: Path) -> Document:
    text = _read_utf8(path)
    title = path.stem
    if path.suffix.lower() in MARKDOWN_SUFFIXES:
        text = clean_markdown(text)
        first = next((ln for ln in text.splitlines() if ln.startswith("#")), None)
        title = first.lstrip("#").strip() if first and first.lstrip("#").strip() else title
    return Document(path.name, title, [(None, text)], str(path))


def iter_jsonl(path: Path):
    """(line number, object) per non-blank line, or (line number, why it is unusable)."""
    for number, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"invalid JSON: {exc.msg}"
            continue
        yield number, row if isinstance(row, dict) else "not an object"


def read_jsonl(
    path: Path, text_field: str = "text", id_field: str = "id", title_field: str | None = None
) -> list[Document]:
    """One document per line; malformed lines are skipped and reported by number."""
    docs: list[Document] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for number, row in iter_jsonl(path):
        if isinstance(row, str):
            skipped.append(f"{number} ({row})")
            continue
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            skipped.append(f"{number} (no text in field {text_field!r})")
            continue
        doc_id = str(row.get(id_field, f"{path.name}:{number}"))
        if doc_id in seen:
            skipped.append(f"{number} (duplicate {id_field} {doc_id!r})")
            continue
        seen.add(doc_id)
        title = str(row.get(title_field) or doc_id) if title_field else doc_id
        docs.append(Document(doc_id, title, [(None, text)], f"{path}:{number}"))
    if not docs:
        raise InputError(
            f"{path}: no usable lines (field {text_field!r}); skipped: {', '.join(skipped[:5])}"
        )
    docs[0].skipped_lines = skipped
    return docs


def read_path(path: Path, **jsonl_fields) -> list[Document]:
    """One file by its suffix (unknown suffixes are read as UTF-8 text)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return [read_pdf(path)]
    if suffix in HTML_SUFFIXES:
        return [read_html(path)]
    if suffix == ".jsonl":
        return read_jsonl(path, **jsonl_fields)
    return [read_text(path)]


def expand(paths: list[Path]) -> list[Path]:
    """Files under the given paths (folders recursively, hidden files skipped), sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            files.append(path)
    return files
