"""Document readers on real files of each kind, and their errors on bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import docx_with_body, encrypt_pdf, make_pdf, make_table_pdf, run_cli

from lmstack.docqa.chunk import chunk_pages
from lmstack.docqa.documents import expand, read_jsonl, read_path
from lmstack.errors import InputError

TWO_PAGES = ["Authenticators are things you have.", "Page two is here."]


def test_pdf_keeps_page_numbers(tmp_path: Path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(TWO_PAGES))
    (doc,) = read_path(path)
    assert doc.doc_id == "report.pdf"
    assert [p for p, _ in doc.pages] == [1, 2]
    assert "Authenticators" in doc.pages[0][1] and "two" in doc.pages[1][1]


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-128", "AES-256"])
def test_owner_password_only_pdfs_are_read(tmp_path: Path, algorithm):
    # Permissions only (no printing, no copying): the empty user password opens them, as
    # it does in every viewer.
    path = tmp_path / "filing.pdf"
    path.write_bytes(encrypt_pdf(make_pdf(TWO_PAGES), "", "owner-secret", algorithm))
    (doc,) = read_path(path)
    assert doc.pages == [(1, TWO_PAGES[0]), (2, TWO_PAGES[1])] and doc.warnings == []


def test_a_pdf_that_needs_a_password_names_the_option(tmp_path: Path):
    path = tmp_path / "locked.pdf"
    path.write_bytes(encrypt_pdf(make_pdf(TWO_PAGES), "user-pw", "owner-pw", "AES-256"))
    with pytest.raises(InputError) as refused:
        read_path(path)
    assert str(refused.value) == (
        f"{path}: the PDF needs a password to open: give it with --pdf-password "
        "(in an upload, the pdf_password field)"
    )
    with pytest.raises(InputError) as wrong:
        read_path(path, pdf_password="guess")
    assert str(wrong.value) == f"{path}: the password given (--pdf-password) does not open this PDF"
    assert "guess" not in str(wrong.value)
    for password in ("user-pw", "owner-pw"):  # either password opens it, as in a viewer
        (doc,) = read_path(path, pdf_password=password)
        assert [text for _, text in doc.pages] == TWO_PAGES


def test_corrupt_and_truncated_pdfs_are_refused(tmp_path: Path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\n garbage \x00\x01\x02")
    with pytest.raises(InputError, match=r"broken\.pdf: not a readable PDF"):
        read_path(broken)
    truncated = tmp_path / "truncated.pdf"
    whole = make_pdf(TWO_PAGES)
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"truncated\.pdf: not a readable PDF"):
        read_path(truncated)


def test_pages_without_text_are_reported_one_by_one(tmp_path: Path):
    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf(["Revenue grew.", None, "", "Costs fell."]))  # a scan, a blank
    (doc,) = read_path(path)
    assert doc.warnings == [
        f"{path} page 2 has no text; OCR is not built in",
        f"{path} page 3 has no text; OCR is not built in",
    ]
    assert [p for p, _ in doc.pages] == [1, 2, 3, 4] and doc.pages[3] == (4, "Costs fell.")
    scanned = tmp_path / "scanned.pdf"
    scanned.write_bytes(make_pdf([None, None]))
    with pytest.raises(InputError) as refused:
        read_path(scanned)
    assert str(refused.value) == (
        f"{scanned}: no text on any of its 2 page(s) (scanned images?); OCR is not built in"
    )


def test_pdf_table_rows_stay_on_their_own_lines(tmp_path: Path):
    rows = [["Company", "Quarter", "Revenue"], ["ACME Corp", "Q1 2024", "1,200"]]
    path = tmp_path / "table.pdf"
    path.write_bytes(make_table_pdf("Results by company.", rows + [["Globex", "Q2 2024", "980"]]))
    (doc,) = read_path(path)
    # pypdf's plain extraction joins a row's cells with one space: rows survive, cell
    # boundaries do not (its "layout" mode would interleave two-column pages instead).
    assert doc.pages[0][1].splitlines() == [
        "Results by company.",
        "Company Quarter Revenue",
        "ACME Corp Q1 2024 1,200",
        "Globex Q2 2024 980",
    ]


def _report_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.core_properties.title = "Annual Report 2024"
    document.add_heading("Results", level=1)
    document.add_paragraph("Revenue grew in every quarter.")
    table = document.add_table(rows=3, cols=3)
    cells = [["Company", "Quarter", "Revenue"], ["ACME", "Q1", "1,200"], ["Globex", "Q2", "980"]]
    for r, row in enumerate(cells):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_heading("Outlook", level=2)
    line = document.add_paragraph("Costs fall")
    line.add_run().add_break()
    line.add_run("next year.")
    document.add_paragraph("Hiring resumes.", style="List Bullet")
    document.add_heading("Risks", level=1)
    document.add_paragraph("Rates may rise.")
    document.save(path)
    return path


def test_docx_paragraphs_headings_and_tables_in_order(tmp_path: Path):
    (doc,) = read_path(_report_docx(tmp_path / "report.docx"))
    assert (doc.doc_id, doc.title, doc.warnings) == ("report.docx", "Annual Report 2024", [])
    assert doc.pages == [
        (
            None,
            "# Results\n\nRevenue grew in every quarter.\n\n"
            "Company | Quarter | Revenue\nACME | Q1 | 1,200\nGlobex | Q2 | 980\n\n"
            "## Outlook\n\nCosts fall\nnext year.\n\n- Hiring resumes.\n\n"
            "# Risks\n\nRates may rise.",
        )
    ]


def test_docx_sections_chunk_like_markdown_ones(tmp_path: Path):
    from lmstack.models import tokenizer

    (doc,) = read_path(_report_docx(tmp_path / "report.docx"))
    chunks = chunk_pages(doc.doc_id, doc.pages, tokenizer(), max_tokens=500, overlap=0)
    assert [c.headings for c in chunks] == [["Results"], ["Risks"]]
    assert "Globex | Q2 | 980" in chunks[0].text and "Outlook" in chunks[0].text


def test_docx_text_boxes_tracked_changes_and_nested_tables(tmp_path: Path):
    # Word writes a text box twice (mc:Choice, and mc:Fallback for old readers), keeps a
    # tracked insertion in w:ins and a deletion as w:delText.
    box = "<w:txbxContent><w:p><w:r><w:t>Boxed note</w:t></w:r></w:p></w:txbxContent>"
    body = (
        "<w:p><w:r><w:t>Before </w:t></w:r><w:ins><w:r><w:t>inserted</w:t></w:r></w:ins>"
        "<w:del><w:r><w:delText>deleted</w:delText></w:r></w:del>"
        f"<w:r><mc:AlternateContent><mc:Choice Requires='wps'>{box}</mc:Choice>"
        f"<mc:Fallback>{box}</mc:Fallback></mc:AlternateContent></w:r></w:p>"
        "<w:tbl><w:tr><w:tc><w:p><w:r><w:t>Outer</w:t></w:r></w:p></w:tc><w:tc>"
        "<w:tbl><w:tr><w:tc><w:p><w:r><w:t>a</w:t></w:r></w:p></w:tc>"
        "<w:tc><w:p><w:r><w:t>b</w:t></w:r></w:p></w:tc></w:tr>"
        "<w:tr><w:tc><w:p><w:r><w:t>c</w:t></w:r></w:p></w:tc></w:tr></w:tbl>"
        "<w:p/></w:tc></w:tr></w:tbl>"
    )
    path = tmp_path / "edited.docx"
    path.write_bytes(docx_with_body(body))
    (doc,) = read_path(path)
    assert doc.pages[0][1] == "Before insertedBoxed note\n\nOuter | a | b; c"
    assert doc.title == "edited"


def test_html_tables_become_lines_of_cells(tmp_path: Path):
    path = tmp_path / "results.html"
    path.write_text(
        "<html><body><h2>Results</h2><p>By company.</p>"
        "<table><caption>Revenue, 2024</caption>"
        "<thead><tr><th>Company</th><th>Quarter</th><th>Revenue</th></tr></thead>"
        "<tr><td>ACME <b>Corp</b></td><td><p>Q1</p><p>2024</p></td><td>1,200</td></tr>"
        "<tr><td>Globex<td>Q2<td>980"  # cells and rows closed implicitly, as HTML allows
        "<tr><td>Nested</td><td><table><tr><td>x</td><td>y</td></tr></table></td></tr>"
        "</table><p>In thousands.</p></body></html>"
    )
    (doc,) = read_path(path)
    lines = [line for line in doc.pages[0][1].splitlines() if line]
    assert lines == [
        "## Results",
        "By company.",
        "Revenue, 2024",
        "Company | Quarter | Revenue",
        "ACME Corp | Q1 2024 | 1,200",
        "Globex | Q2 | 980",
        "Nested | x | y",
        "In thousands.",
    ]
    # The table is one paragraph: its rows are chunked together while they fit.
    assert "Revenue, 2024\nCompany | Quarter | Revenue\nACME Corp" in doc.pages[0][1]


def test_a_legacy_doc_file_is_named_as_such(tmp_path: Path):
    path = tmp_path / "old.doc"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512))
    with pytest.raises(InputError, match=r"old\.doc: a Word 97-2003 file \(\.doc\), not DOCX"):
        read_path(path)


@pytest.mark.slow
def test_docs_add_reports_warnings_and_takes_a_pdf_password(tmp_path: Path, capsys):
    folder = tmp_path / "filings"
    folder.mkdir()
    (folder / "scan.pdf").write_bytes(make_pdf(["Kerberos tickets expire.", None]))
    locked = make_pdf(["Passkeys resist phishing."])
    (folder / "locked.pdf").write_bytes(encrypt_pdf(locked, "s3cret", "owner", "AES-128"))
    store = str(tmp_path / "docs.db")
    code, out, err = run_cli(["docs", "add", str(folder), "--store", store], capsys)
    assert code == 2 and "1 added" in out
    assert f"warning: {folder / 'scan.pdf'} page 2 has no text; OCR is not built in" in err
    assert f"error: {folder / 'locked.pdf'}: the PDF needs a password" in err
    assert "--pdf-password" in err
    code, out, err = run_cli(
        ["docs", "add", str(folder), "--store", store, "--pdf-password", "s3cret", "--json"],
        capsys,
    )
    report = json.loads(out)
    assert code == 0 and report["added"] == ["locked.pdf"] and report["unchanged"] == ["scan.pdf"]
    assert report["warnings"] == [
        {"path": str(folder / "scan.pdf"), "warning": f"{folder / 'scan.pdf'} page 2 has no "
         "text; OCR is not built in"}
    ]  # fmt: skip
    assert "s3cret" not in out + err
    code, out, _ = run_cli(["docs", "list", "--store", store, "--json"], capsys)
    assert "s3cret" not in out and (tmp_path / "docs.db").exists()


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
