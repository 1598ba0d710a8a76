"""Word documents (DOCX, through python-docx): paragraphs, lists and tables in document
order, headings as Markdown headings, with the ZIP's declared sizes checked before anything
is unpacked."""

from __future__ import annotations

import re
from pathlib import Path

from lmstack.docqa.documents import (
    CELL_SEPARATOR,
    MAX_EXTRACTED_CHARS,
    MAX_TABLE_CELLS,
    Document,
    clean_text,
)
from lmstack.errors import InputError

# A DOCX is a ZIP: what its members unpack to, by their declared sizes (zipfile never
# inflates a member past its declared size), before python-docx loads every part.
MAX_DOCX_UNPACKED_BYTES = 256_000_000
MAX_DOCX_XML_BYTES = 32_000_000  # the XML parts (a 1,000-page report's is about 10 MB)


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
        return clean_text("".join(parts))

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
