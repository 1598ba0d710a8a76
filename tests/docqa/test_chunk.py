"""Chunking never exceeds the token limit, keeps headings and pages, and overlaps."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.config import data_dir
from lmstack.docqa.chunk import chunk_pages
from lmstack.errors import InputError

NIST = data_dir() / "nist-sp800-63-3"


def within_limit(chunks, tok, limit):
    return all(len(tok.encode(c.text)) <= limit and c.tokens <= limit for c in chunks)


def test_nist_report_chunks_respect_limit_and_keep_headings(model):
    _, tok = model
    text = (NIST / "sec4_model.md").read_text()
    chunks = chunk_pages("sec4_model.md", [(None, text)], tok, max_tokens=500, overlap=50)
    assert len(chunks) > 5 and within_limit(chunks, tok, 500)
    assert [c.chunk_id for c in chunks] == list(range(len(chunks)))
    assert any("Digital Identity Model" in c.heading_path for c in chunks)
    # Every paragraph's opening words survive somewhere in the chunks.
    joined = " ".join(c.text for c in chunks)
    for paragraph in [p for p in text.split("\n\n") if p.strip() and not p.startswith("#")][:40]:
        assert " ".join(paragraph.split()[:6]) in " ".join(joined.split())


@pytest.mark.parametrize(
    "text",
    [
        "word " * 2000,  # 10,000 characters on one line, no sentence ends
        "x" * 20000,  # no spaces at all
        "| a | b | c |\n|---|---|---|\n" + "| 1 | 2 | 3 |\n" * 800,  # a table
        "数字身份指南" * 1500,  # CJK with no spaces
        "🚀é" * 3000,  # multi-byte characters that BPE splits mid-character
    ],
)
def test_no_chunk_exceeds_the_limit_whatever_the_input(model, text):
    _, tok = model
    chunks = chunk_pages("doc", [(1, text)], tok, max_tokens=64, overlap=8)
    assert chunks and within_limit(chunks, tok, 64)
    assert all(c.page == 1 for c in chunks)


def test_pages_and_overlap(model):
    _, tok = model
    sentences = [f"Sentence number {i} talks about topic {i % 7}." for i in range(60)]
    pages = [(1, " ".join(sentences[:30])), (2, " ".join(sentences[30:]))]
    chunks = chunk_pages("doc", pages, tok, max_tokens=48, overlap=16)
    assert {c.page for c in chunks} == {1, 2} and within_limit(chunks, tok, 48)
    shared = [
        a for a, b in zip(chunks, chunks[1:]) if a.text.split("\n\n")[-1] in b.text.split("\n\n")
    ]
    assert shared, "consecutive chunks should share a trailing unit"


def test_bad_parameters(model):
    _, tok = model
    with pytest.raises(InputError, match="at least 16 tokens"):
        chunk_pages("d", [(None, "x")], tok, max_tokens=8)
    with pytest.raises(InputError, match="overlap"):
        chunk_pages("d", [(None, "x")], tok, max_tokens=100, overlap=60)


def test_empty_document_gives_no_chunks(model, tmp_path: Path):
    _, tok = model
    assert chunk_pages("d", [(None, "\n\n   \n")], tok) == []
