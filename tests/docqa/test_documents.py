"""Document readers on real files of each kind, and their errors on bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_pdf

from lmstack.docqa.documents import expand, read_jsonl, read_path
from lmstack.errors import InputError


def test_pdf_keeps_page_numbers(tmp_path: Path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(["Authenticators are things you have.", "Page two is here."]))
    (doc,) = read_path(path)
    assert doc.doc_id == "report.pdf"
    assert [p for p, _ in doc.pages] == [1, 2]
    assert "Authenticators" in doc.pages[0][1] and "two" in doc.pages[1][1]


def test_encrypted_and_corrupt_pdfs_are_refused(tmp_path: Path):
    from pypdf import PdfReader, PdfWriter

    plain = tmp_path / "plain.pdf"
    plain.write_bytes(make_pdf(["Secret text."]))
    writer = PdfWriter()
    for page in PdfReader(str(plain)).pages:
        writer.add_page(page)
    writer.encrypt("pw")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as handle:
        writer.write(handle)
    with pytest.raises(InputError, match="encrypted"):
        read_path(locked)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\n garbage \x00\x01\x02")
    with pytest.raises(InputError, match="broken.pdf"):
        read_path(broken)


def test_markdown_html_and_text(tmp_path: Path):
    md = tmp_path / "guide.md"
    md.write_text("# Identity Guide\n\n## Proofing\n\nEvidence is checked.\n")
    (doc,) = read_path(md)
    assert doc.title == "Identity Guide" and "## Proofing" in doc.pages[0][1]
    html = tmp_path / "page.html"
    html.write_text(
        "<html><head><title>Auth</title><style>p{}</style><script>var x=1</script></head>"
        "<body><h2>Factors</h2><p>Something you know &amp; have.</p></body></html>"
    )
    (doc,) = read_path(html)
    text = doc.pages[0][1]
    assert doc.title == "Auth" and "## Factors" in text and "know & have." in text
    assert "var x" not in text and "p{}" not in text


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"\x00\x01\x02binary\x00", "binary"),
        ("café".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_text_files(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_path(path)


def test_missing_path(tmp_path: Path):
    with pytest.raises(InputError, match="no such file"):
        read_path(tmp_path / "nope.md")


def test_jsonl_skips_bad_lines_and_reports_them(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        json.dumps({"id": "a", "body": "First.", "name": "A"}),
        "{not json",
        json.dumps({"id": "b", "body": ""}),
        json.dumps(["list"]),
        json.dumps({"id": "a", "body": "Duplicate."}),
        json.dumps({"id": "c", "body": "Third.", "name": "C"}),
    ]
    path.write_text("\n".join(rows) + "\n")
    docs = read_jsonl(path, text_field="body", id_field="id", title_field="name")
    assert [d.doc_id for d in docs] == ["a", "c"] and docs[1].title == "C"
    skipped = docs[0].skipped_lines
    assert [s.split()[0] for s in skipped] == ["2", "3", "4", "5"]
    with pytest.raises(InputError, match="no usable lines"):
        read_jsonl(path, text_field="missing")


def test_content_hash_changes_with_content(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    first = read_path(path)[0].content_hash
    assert read_path(path)[0].content_hash == first
    path.write_text("two")
    assert read_path(path)[0].content_hash != first


def test_expand_walks_folders(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / ".hidden").write_text("h")
    assert [p.name for p in expand([tmp_path])] == ["a.txt", "b.md"]
