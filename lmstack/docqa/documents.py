"""Reading documents: PDF (pages kept), DOCX, Markdown, HTML, plain text and JSONL corpora.

Every reader returns `Document`s whose text is a list of (page, text) pairs, the shape the
chunker takes. Headings become Markdown headings (the chunker splits at them) and each
table row becomes one line with its cells separated by " | ". Bad files raise InputError
naming the file and what is wrong; a JSONL corpus skips malformed lines and reports their
numbers instead of failing the batch; what a file lacks without being unreadable (a PDF
page with no text layer) is a warning on its Document.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import re
import subprocess
import sys
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
# pypdf can spend hours on a file of 2 KB (measured: 24 s a page for a content stream of a
# million operators in 17 KB; a form of 100,000 operators drawn 5,000 times, 0.8 s a drawing,
# over an hour), so PDFs are read in a child process stopped at a deadline that grows with
# the file (text-heavy PDFs read at 1-2 s per MB).
PDF_SECONDS_BASE = 30.0
PDF_SECONDS_PER_MB = 10.0
PDF_MEMORY_BYTES = 2 << 30  # the child's address space
# A DOCX is a ZIP: what its members unpack to, by their declared sizes (zipfile never
# inflates a member past its declared size), before python-docx loads every part.
MAX_DOCX_UNPACKED_BYTES = 256_000_000
MAX_DOCX_XML_BYTES = 32_000_000  # the XML parts (a 1,000-page report's is about 10 MB)


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


def read_pdf(path: Path, password: str | None = None) -> Document:
    """Pages of a PDF, numbered from 1; a page without a text layer is a warning.

    Encrypted PDFs are opened with the empty user password first, as every viewer does
    (many published PDFs carry only an owner password, restricting printing or copying),
    then with `password`. The password travels to the reader on a pipe, never on a
    command line, and is neither logged nor stored.
    """
    limit = PDF_SECONDS_BASE + PDF_SECONDS_PER_MB * path.stat().st_size / 1e6
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PDF_CHILD.format(root=str(Path(__file__).parents[2]))],
            input=json.dumps({"path": str(path), "password": password}),
            capture_output=True,
            text=True,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:
        raise InputError(
            f"{path}: reading the PDF took longer than the limit of {limit:.0f} s "
            f"({PDF_SECONDS_BASE:.0f} s + {PDF_SECONDS_PER_MB:.0f} s per MB); "
            "the file may be built to stall readers"
        ) from None
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise InputError(
            f"{path}: the PDF reader stopped (exit code {done.returncode}) before it finished; "
            f"the file may need more than the limit of {PDF_MEMORY_BYTES >> 30} GiB of memory"
        )
    if "error" in result:
        raise InputError(result["error"])
    texts: list[str] = result["pages"]
    if not texts:
        raise InputError(f"{path}: the PDF has no pages")
    blank = [n for n, text in enumerate(texts, 1) if not text.strip()]
    if len(blank) == len(texts):
        raise InputError(
            f"{path}: no text on any of its {len(texts)} page(s) (scanned images?); "
            "OCR is not built in"
        )
    warnings = [f"{path} page {n} has no text; OCR is not built in" for n in blank]
    pages: list[tuple[int | None, str]] = list(enumerate(texts, 1))
    title = result["title"] or path.stem
    return Document(path.name, title, pages, str(path), warnings=warnings)


# The child imports this module from where the parent found it (a checkout, or a wheel in
# site-packages, already on the path: added again in front it could shadow the stdlib).
_PDF_CHILD = (
    "import sys; root = {root!r}; root in sys.path or sys.path.insert(0, root); "
    "from lmstack.docqa.documents import pdf_child; pdf_child()"
)


def pdf_child() -> None:
    """The reading side of read_pdf, in its own process: {"path", "password"} on stdin,
    {"title", "pages"} or {"error"} as one JSON object on stdout."""
    import logging

    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = PDF_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(hard, PDF_MEMORY_BYTES)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, ValueError, OSError):  # not a POSIX system: the deadline still holds
        pass
    logging.disable(logging.WARNING)  # pypdf logs each object it repairs
    request = json.loads(sys.stdin.read())
    path = Path(request["path"])
    try:
        result = extract_pdf(path, request["password"])
    except InputError as exc:
        result = {"error": str(exc)}
    except MemoryError:
        result = {
            "error": f"{path}: reading the PDF needs more than the limit of "
            f"{PDF_MEMORY_BYTES >> 30} GiB of memory"
        }
    sys.stdout.write(json.dumps(result))


def extract_pdf(path: Path, password: str | None = None) -> dict:
    """{"title": str or None, "pages": [text of each page]}, in this process (read_pdf runs
    it in a child with a deadline; call it directly only on trusted files)."""
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    number = 0
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            _decrypt(reader, path, password)
        texts: list[str] = []
        total = 0
        for number, page in enumerate(reader.pages, 1):
            # Plain mode, not "layout": layout keeps columns apart with runs of spaces but
            # interleaves the lines of two-column pages; plain mode already puts each table
            # row on its own line (measured: docs/docqa.md).
            text = _clean(page.extract_text() or "")
            total += len(text)
            if total > MAX_EXTRACTED_CHARS:
                raise InputError(
                    f"{path}: the text passes the limit of {MAX_EXTRACTED_CHARS:,} characters "
                    f"at page {number}"
                )
            texts.append(text)
    except InputError:
        raise
    except DependencyError:
        raise InputError(
            f"{path}: the PDF is AES-encrypted, which needs the cryptography package: "
            "pip install 'lmstack[docqa]'"
        ) from None
    except Exception as exc:  # pypdf on hostile bytes raises nearly anything: unreadable
        where = f" at page {number}" if number else ""
        raise InputError(
            f"{path}: not a readable PDF{where} ({type(exc).__name__}: {exc})"
        ) from None
    return {"title": _pdf_title(reader), "pages": texts}


def _pdf_title(reader) -> str | None:
    try:
        title = reader.metadata.title if reader.metadata else None
    except Exception:  # a broken information dictionary costs the title, not the text
        return None
    return _clean(str(title)).strip() or None if title else None


def _decrypt(reader, path: Path, password: str | None) -> None:
    from pypdf import PasswordType

    try:
        if reader.decrypt("") != PasswordType.NOT_DECRYPTED:
            return
        if password is None:
            raise InputError(
                f"{path}: the PDF needs a password to open: give it with --pdf-password "
                "(in an upload, the pdf_password field)"
            )
        if reader.decrypt(password) == PasswordType.NOT_DECRYPTED:
            raise InputError(f"{path}: the password given (--pdf-password) does not open this PDF")
    except NotImplementedError as exc:  # an encryption handler other than the standard one
        raise InputError(
            f"{path}: the PDF's encryption is not supported by pypdf ({exc})"
        ) from None


def _clean(text: str) -> str:
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


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_WRAPPERS = {_W + "sdt", _W + "sdtContent", _W + "customXml"}  # content controls: look inside
_FALLBACK = "{http://schemas.openxmlformats.org/markup-compatibility/2006}Fallback"
_RUN_TEXT = tuple(_W + t for t in ("t", "tab", "br", "cr", "noBreakHyphen"))
_HEADING_STYLE = re.compile(r"heading\s*([1-9])", re.I)


def read_docx(path: Path) -> Document:
    """Paragraphs and tables of a Word document, in order; headings as Markdown headings.

    Headers, footers, footnotes and comments are left out. Text in tracked insertions is
    kept and deleted text dropped, as Word shows the document with changes accepted.
    """
    import zipfile

    with path.open("rb") as handle:
        magic = handle.read(8)
    if magic.startswith(b"\xd0\xcf\x11\xe0"):  # OLE2: Word 97-2003, or Office encryption
        if path.suffix.lower() == ".doc":
            raise InputError(f"{path}: a Word 97-2003 file (.doc), not DOCX: save it as .docx")
        raise InputError(
            f"{path}: an OLE2 file, not a DOCX (ZIP): a password-protected Word document "
            "(remove its password in Word) or a .doc renamed .docx (save it as .docx)"
        )
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(
            f"{path}: not a DOCX file: not a ZIP archive, or a truncated one ({exc})"
        ) from None
    with archive:
        members = archive.infolist()
        names = {m.filename for m in members}
        if "[Content_Types].xml" not in names or not any(n.startswith("word/") for n in names):
            raise InputError(
                f"{path}: a ZIP archive, but not a Word document (no word/ part): "
                "another file renamed .docx?"
            )
        unpacked = sum(m.file_size for m in members)
        if unpacked > MAX_DOCX_UNPACKED_BYTES:
            raise InputError(
                f"{path}: unpacks to {unpacked:,} bytes, the limit is "
                f"{MAX_DOCX_UNPACKED_BYTES:,} (a ZIP bomb?)"
            )
        xml = sum(m.file_size for m in members if m.filename.endswith((".xml", ".rels")))
        if xml > MAX_DOCX_XML_BYTES:
            raise InputError(
                f"{path}: its XML unpacks to {xml:,} bytes, the limit is {MAX_DOCX_XML_BYTES:,}"
            )
    try:
        import docx

        document = docx.Document(str(path))
        blocks, title = _DocxText(document, path).read()
    except InputError:
        raise
    except Exception as exc:  # python-docx, lxml and zipfile on hostile bytes: unreadable
        raise InputError(f"{path}: not a readable DOCX ({type(exc).__name__}: {exc})") from None
    text = "\n\n".join(blocks)
    if not text.strip():
        raise InputError(f"{path}: the document has no text")
    return Document(path.name, title or path.stem, [(None, text)], str(path))


class _DocxText:
    """The text blocks of a python-docx Document, read from its XML in one pass."""

    def __init__(self, document, path: Path) -> None:
        self.document = document
        self.path = path
        self.chars = 0
        # style id -> (name, based on, outline level, numbered: a list style)
        self.styles: dict[str, tuple[str, str | None, str | None, bool]] = {}
        for style in document.styles.element.iterchildren(_W + "style"):
            self.styles[style.get(_W + "styleId", "")] = (
                _val(style, "name") or "",
                _val(style, "basedOn"),
                _val(style, "pPr", "outlineLvl"),
                style.find(f"{_W}pPr/{_W}numPr") is not None,
            )
        self.levels: dict[str | None, int | None] = {}
        self.lists: dict[str | None, bool] = {}

    def read(self) -> tuple[list[str], str | None]:
        blocks: list[str] = []
        title = (self.document.core_properties.title or "").strip() or None
        first_heading = None
        for element in _blocks(self.document.element.body):
            if element.tag == _W + "tbl":
                block = self.table(element)
            else:
                text = self.paragraph_text(element)
                level = self.heading_level(element)
                if level is not None and text.strip():
                    text = " ".join(text.split())
                    first_heading = first_heading or text
                    block = "#" * level + " " + text
                elif text.strip() and self.is_list_item(element):
                    block = "- " + text.strip()
                else:
                    block = text.strip()
            if block:
                self.chars += len(block)
                if self.chars > MAX_EXTRACTED_CHARS:
                    raise InputError(
                        f"{self.path}: the text passes the limit of {MAX_EXTRACTED_CHARS:,} "
                        "characters"
                    )
                blocks.append(block)
        return blocks, title or first_heading

    def paragraph_text(self, paragraph) -> str:
        """A paragraph's text, tabs and breaks, in order; not the fallback copy of a text box
        (mc:Fallback repeats mc:Choice for older readers). Deleted text and field codes are
        other elements (w:delText, w:instrText)."""
        fallbacks = next(paragraph.iter(_FALLBACK), None) is not None
        parts = []
        for node in paragraph.iter(*_RUN_TEXT):
            if node.getparent().tag != _W + "r":
                continue  # a w:tab that defines a tab stop
            if fallbacks and next(node.iterancestors(_FALLBACK), None) is not None:
                continue
            tag = node.tag[len(_W) :]
            if tag == "t":
                parts.append(node.text or "")
            elif tag == "tab":
                parts.append("\t")
            elif tag == "noBreakHyphen":
                parts.append("-")
            else:  # br, cr
                parts.append("\n")
        return _clean("".join(parts))

    def heading_level(self, paragraph) -> int | None:
        """1-6 for a heading (Word's "Heading N" styles, the Title style, or an outline
        level on the paragraph or its style chain), else None."""
        outline = _val(paragraph, "pPr", "outlineLvl")
        if outline is not None:
            return _outline_level(outline)
        style_id = _val(paragraph, "pPr", "pStyle")
        if style_id not in self.levels:
            level, seen, current = None, set(), style_id
            while current in self.styles and current not in seen:  # basedOn can loop
                seen.add(current)
                name, based_on, outline, _ = self.styles[current]
                found = _HEADING_STYLE.fullmatch(name.strip())
                if found:
                    level = int(found.group(1))
                elif name.strip().lower() == "title":
                    level = 1
                elif outline is not None:
                    level = _outline_level(outline)
                else:
                    current = based_on
                    continue
                break
            self.levels[style_id] = None if level is None else min(level, 6)
        return self.levels[style_id]

    def is_list_item(self, paragraph) -> bool:
        """Numbered or bulleted: numbering on the paragraph or on its style chain."""
        if paragraph.find(f"{_W}pPr/{_W}numPr") is not None:
            return True
        style_id = _val(paragraph, "pPr", "pStyle")
        if style_id not in self.lists:
            listed, seen, current = False, set(), style_id
            while current in self.styles and current not in seen and not listed:
                seen.add(current)
                _, current, _, listed = self.styles[current]
            self.lists[style_id] = listed
        return self.lists[style_id]

    def table(self, table) -> str:
        cells = sum(1 for _ in table.iter(_W + "tc"))
        if cells > MAX_TABLE_CELLS:
            raise InputError(
                f"{self.path}: a table has {cells:,} cells, the limit is {MAX_TABLE_CELLS:,}; "
                "ingest data this size as JSONL records"
            )
        lines = []
        for row in _children(table, _W + "tr"):
            texts = []
            for cell in _children(row, _W + "tc"):
                words = []
                for element in _blocks(cell):
                    if element.tag == _W + "tbl":  # a table in a cell: its rows, joined
                        words.append(self.table(element).replace("\n", "; "))
                    else:
                        words.append(self.paragraph_text(element))
                texts.append(" ".join(" ".join(words).split()))
            if any(texts):
                lines.append(CELL_SEPARATOR.join(texts))
        return "\n".join(lines)


def _blocks(container):
    """The paragraphs and tables directly in `container` (the body, a cell), in order."""
    for child in container.iterchildren():
        if child.tag in (_W + "p", _W + "tbl"):
            yield child
        elif child.tag in _WRAPPERS:
            yield from _blocks(child)


def _children(element, tag: str):
    for child in element.iterchildren():
        if child.tag == tag:
            yield child
        elif child.tag in _WRAPPERS:
            yield from _children(child, tag)


def _val(element, *path: str) -> str | None:
    """The w:val of the element at `path` under `element`, else None."""
    found = element.find("/".join(_W + p for p in path))
    return None if found is None else found.get(_W + "val")


def _outline_level(value: str) -> int | None:
    # w:outlineLvl is 0-8 for headings 1-9 (9 is body text); Markdown stops at 6.
    level = int(value) + 1 if value.isdigit() else 10
    return min(level, 6) if level <= 9 else None


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
        return [read_pdf(path, pdf_password)]
    if suffix in (".docx", ".doc"):
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
