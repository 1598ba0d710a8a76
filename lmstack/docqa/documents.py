"""Reading documents: PDF (pages kept), DOCX, Markdown, HTML, plain text and JSONL corpora.

PDFs are read by lmstack.docqa.pdf (in a child process, with a deadline), Word files by
lmstack.docqa.word; both build on what is here. Every reader returns `Document`s whose
text is a list of (page, text) pairs, the shape the chunker takes. Headings become Markdown
headings (the chunker splits at them) and each table row becomes one line with its cells
separated by " | ". Bad files raise InputError naming the file and what is wrong; a JSONL
corpus skips malformed lines and reports their numbers instead of failing the batch; what a
file lacks without being unreadable (a PDF page with no text layer) is a warning on its
Document.
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

CELL_SEPARATOR = " | "
# One table's cells (HTML or DOCX): more is a data dump, not a document (10,000 rows of
# 10 columns), and better ingested as JSONL records.
MAX_TABLE_CELLS = 100_000
# Text of one PDF or DOCX: about 10,000 dense pages.
MAX_EXTRACTED_CHARS = 20_000_000


@dataclass
class Document:
    doc_id: str
    title: str
    pages: list[tuple[int | None, str]]
    source: str
    content_hash: str = ""
    skipped_lines: list[str] = field(default_factory=list)  # JSONL only: "N (why)"
    warnings: list[str] = field(default_factory=list)  # read, but something is missing

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


def clean_text(text: str) -> str:
    # PDF and DOCX text can hold NULs and lone surrogates, which neither UTF-8 nor the
    # store accepts.
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


_SECTION_NAME = re.compile(r"([a-zA-Z][-_.a-zA-Z0-9]*)\s*")  # _markupbase's name token
_SECTION_KEYWORDS = {"temp", "cdata", "ignore", "include", "rcdata", "if", "else", "endif"}


class _Table:
    """An open <table>: its finished lines, and the row, cell or caption being read."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.caption: list[str] | None = None
        self.cells = 0

    def end_cell(self) -> None:
        if self.cell is not None:
            if self.row is None:
                self.row = []
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None

    def end_caption(self) -> None:
        if self.caption is not None:
            caption = " ".join("".join(self.caption).split())
            if caption:
                self.lines.append(caption)
            self.caption = None

    def end_row(self) -> None:
        self.end_caption()
        self.end_cell()
        if self.row is not None and any(self.row):
            self.lines.append(CELL_SEPARATOR.join(self.row))
        self.row = None


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; headings become Markdown headings for the chunker, and
    each table row one line of cells separated by " | " (the header row too)."""

    SKIP = {"script", "style", "noscript", "template"}
    BLOCK = {"p", "div", "li", "tr", "br", "section", "article", "table", "ul", "ol", "pre"}

    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.path = path
        self.parts: list[str] = []
        self.skipping = 0
        self.title = ""
        self._in_title = False
        self.tables: list[_Table] = []  # open tables, innermost last

    def _break(self, text: str) -> None:
        """A block boundary: a new paragraph outside tables, a space inside a cell."""
        table = self.tables[-1] if self.tables else None
        if table is None:
            self.parts.append(text)
        elif table.cell is not None:
            table.cell.append(" ")
        elif table.caption is not None:
            table.caption.append(" ")

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "table":
            self._break("\n\n")
            self.tables.append(_Table())
        elif self.tables and tag == "tr":
            self.tables[-1].end_row()
            self.tables[-1].row = []
        elif self.tables and tag in ("td", "th"):
            table = self.tables[-1]
            table.end_caption()
            table.end_cell()
            table.cells += 1
            if table.cells > MAX_TABLE_CELLS:
                raise InputError(
                    f"{self.path}: a table has more than {MAX_TABLE_CELLS:,} cells, the limit; "
                    "ingest data this size as JSONL records"
                )
            table.cell = []
        elif self.tables and tag == "caption":
            self.tables[-1].end_row()
            self.tables[-1].caption = []
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._break("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCK:
            self._break("\n\n" if tag != "br" else "\n")
        elif tag in ("td", "th"):  # a cell outside any table: keep its words apart
            self.parts.append(" ")

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "title":
            self._in_title = False
        elif self.tables and tag == "table":
            self._end_table()
        elif self.tables and tag in ("td", "th"):
            self.tables[-1].end_cell()
        elif self.tables and tag == "tr":
            self.tables[-1].end_row()
        elif self.tables and tag == "caption":
            self.tables[-1].end_caption()
        elif (len(tag) == 2 and tag[0] == "h") or tag in self.BLOCK:
            self._break("\n\n")

    def _end_table(self) -> None:
        table = self.tables.pop()
        table.end_row()
        if not self.tables:
            self.parts.append("\n\n" + "\n".join(table.lines) + "\n\n")
            return
        outer = self.tables[-1]  # a table in a cell: its rows become part of that cell
        nested = "; ".join(table.lines)
        if outer.cell is not None:
            outer.cell.append(" " + nested + " ")
        elif nested:
            outer.lines.append(nested)

    def handle_data(self, data) -> None:
        if self._in_title:
            self.title += data
        elif self.skipping:
            return
        elif not self.tables:
            self.parts.append(data)
        else:
            table = self.tables[-1]
            if table.cell is not None:
                table.cell.append(data)
            elif table.caption is not None:
                table.caption.append(data)
            elif data.strip():  # text between a table's cells: browsers show it, so keep it
                table.end_row()
                table.lines.append(" ".join(data.split()))

    def finish(self) -> None:
        """The end of the page: tables left open are ended. (Not HTMLParser.close(), which
        rescans to the end of the text from each unterminated "<!--" or "<a": quadratic.)"""
        while self.tables:
            self._end_table()

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
    parser = _HTMLText(path)
    parser.feed(_read_utf8(path))
    parser.finish()
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


def read_path(path: Path, pdf_password: str | None = None, **jsonl_fields) -> list[Document]:
    """One file by its suffix (unknown suffixes are read as UTF-8 text)."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        from lmstack.docqa.pdf import read_pdf

        return [read_pdf(path, pdf_password)]
    if suffix in (".docx", ".doc"):
        from lmstack.docqa.word import read_docx

        return [read_docx(path)]
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
