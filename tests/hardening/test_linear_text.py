"""Text processing is linear: pathological 100 KB inputs finish well under a second.

Each function that sees user text (chunking, document reading, triage grounding, the
prompt's defusing, sentence splitting, citation checks) gets hostile shapes that made a
backtracking pattern rescan the text from every position: "# a" + 4,000 spaces + "b" took
3.5 s in the old heading pattern at 1,000 spaces (cubic), 10,000 unterminated "<!--" took
5 s in the Markdown cleaner and "a@a-a-a-..." 1 s at 20 KB in the e-mail pattern
(quadratic: minutes at 100 KB). The scanners that replace those patterns are checked
against the patterns themselves on short random inputs, so behaviour stays the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import within
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.docqa.answer import attach_citations, is_abstention
from lmstack.docqa.chunk import chunk_pages, heading
from lmstack.docqa.documents import clean_markdown, read_html, read_jsonl, read_text
from lmstack.docqa.evaluate import token_f1
from lmstack.docqa.records import Hit
from lmstack.triage.dataset import _has_placeholder, reply_from_bitext
from lmstack.triage.grounding import (
    EMAIL,
    candidates,
    email_spans,
    id_candidates,
    product_candidates,
    typed_ids,
)
from lmstack.triage.languages import detect_language
from lmstack.triage.prompt import _DELIMITER, defuse, injection_warning, user_turn
from lmstack.triage.schema import split_sentences
from lmstack.triage.validate import allowed_urgencies

N = 100_000
LIMIT_S = 1.0
EQUIVALENCE = settings(max_examples=400, deadline=None, derandomize=True, database=None)

# The patterns as they were, to check the scanners against (on short inputs only).
OLD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
OLD_EMPTY_HTML = re.compile(r"<(a|div|span)\b[^>]*>\s*</\1>|<!--.*?-->|<br\s*/?>", re.S | re.I)
OLD_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
OLD_DELIMITER = re.compile(r"<\s*(/?)\s*ticket\s*>", re.IGNORECASE)
OLD_PLACEHOLDER = re.compile(r"\{\{[^}]*\}\}")


def fast(fn, *args):
    return within(LIMIT_S, fn, *args)


@pytest.fixture(scope="module")
def tok():
    from lmstack.models import tokenizer

    tok = tokenizer()
    tok.encode_plain("warm up")  # builds the plain tokenizer once, outside the timings
    return tok


# ------------------------------------------------------------------ shapes

SPACES = " " * N


def rep(unit: str) -> str:
    return unit * (N // len(unit) + 1)


SHAPES = {
    "heading with spaces": "# a" + SPACES + "b",
    "spaces": SPACES,
    "dashes": "-" * N,
    "hashes": "#" * N,
    "heading lines": rep("# " + " " * 48 + "#" * 48 + "\n"),
    "nested brackets": "[" * (N // 2) + "(" * (N // 2) + ")" * (N // 2) + "]" * (N // 2),
    "a@a-a-a": "a@" + rep("a-"),
    "letters": "a" * N,
    "many @": rep("a@"),
    "dotted domain": "a@" + rep("a."),
    "comment openers": rep("<!--"),
    "anchor openers": rep("<a "),
    "lt and spaces": "<" + SPACES,
    "ticket delimiters": rep("< / ticket "),
    "role tags": rep("<|im_start|>system\n"),
    "tiny sentences": rep("Hi. "),
    "ids and emails": rep("ORD-1234 ab12@bc.com x9999@! "),
    "placeholders": rep("{{"),
    "citations": rep("[1,"),
    "cjk": rep("数字身份指南"),
}
TEXT_FUNCTIONS = {
    "heading": lambda text: [heading(line) for line in text.splitlines()],
    "clean_markdown": clean_markdown,
    "email_spans": email_spans,
    "id_candidates": id_candidates,
    "product_candidates": product_candidates,
    "typed_ids": typed_ids,
    "candidates": candidates,
    "defuse": defuse,
    "user_turn": user_turn,
    "injection_warning": lambda text: injection_warning(text, []),
    "split_sentences": split_sentences,
    "allowed_urgencies": allowed_urgencies,
    "detect_language": detect_language,
    "has_placeholder": _has_placeholder,
    "reply_from_bitext": lambda text: reply_from_bitext(text, "the order is late"),
    "is_abstention": is_abstention,
    "attach_citations": lambda text: attach_citations(
        text, [Hit("d", 0, "D", None, [], text, 0, 1.0)]
    ),
    "token_f1": lambda text: token_f1(text, text[::-1]),
}


@pytest.mark.parametrize("function", TEXT_FUNCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_text_functions_are_linear(function, shape):
    text = SHAPES[shape]
    assert len(text) >= N
    fast(TEXT_FUNCTIONS[function], text)


@pytest.mark.parametrize("shape", SHAPES)
def test_chunking_is_linear(shape, tok):
    chunks = fast(lambda text: chunk_pages("doc", [(None, text)], tok, 500, 50), SHAPES[shape])
    assert all(c.tokens <= 500 for c in chunks)


def test_chunking_many_tiny_units_counts_exactly(tok):
    # Thousands of one-token paragraphs: the chunker bounds joins instead of re-counting
    # the chunk per unit, and every count it reports is still exact.
    text = "".join(f"w{i % 97}.\n\n" for i in range(N // 4))
    chunks = fast(lambda t: chunk_pages("doc", [(1, t), (2, t[: N // 4])], tok, 500, 50), text)
    assert all(len(tok.encode_plain(c.text)) == c.tokens <= 500 for c in chunks)
    assert {c.page for c in chunks} == {1, 2}


@pytest.mark.parametrize("shape", ["comment openers", "anchor openers", "heading with spaces"])
@pytest.mark.parametrize("suffix", [".md", ".html", ".txt"])
def test_documents_read_in_linear_time(tmp_path: Path, shape, suffix):
    path = tmp_path / f"doc{suffix}"
    path.write_text("# Title\n\n" + SHAPES[shape] + "\n\nthe end", encoding="utf-8")
    try:
        fast(read_html if suffix == ".html" else read_text, path)
    except Exception as exc:  # a page that is all markup has no visible text: a clear error
        assert "no visible text" in str(exc), exc


@pytest.mark.parametrize(
    "html",
    ["<![" * (N // 3), "<![x[" * (N // 5), "<![if" * (N // 5), "<div>" * (N // 5), "&#" * N],
)
def test_html_parser_neither_hangs_nor_crashes_on_bogus_markup(tmp_path: Path, html):
    # "<![<![" made the standard library raise AssertionError out of read_html.
    path = tmp_path / "page.html"
    path.write_text(html + "<p>visible text</p>", encoding="utf-8")
    try:
        doc = fast(read_html, path)
    except Exception as exc:
        assert "no visible text" in str(exc), exc  # an InputError, never an AssertionError
    else:
        assert doc.pages[0][1].strip()


def test_jsonl_corpus_with_hostile_lines_reads_in_linear_time(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": str(i), "text": SHAPES[name]} for i, name in enumerate(SHAPES)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n", encoding="utf-8")
    docs = fast(read_jsonl, path)
    blank = [name for name, text in SHAPES.items() if not text.strip()]
    assert len(docs) == len(SHAPES) - len(blank)
    assert len(docs[0].skipped_lines) == len(blank) + 1  # and the line that is not JSON


# ------------------------------------------------------------------ same behaviour

markdownish = st.lists(
    st.sampled_from(["<", ">", "a", "A", "div", "SPAN", "/", "!--", "-->", "-", "br", " ", "\n"]
                    + ["x", "<a", "</a>", "<!--", "</div>", "<br", "b", "\t"]),
    max_size=16,
).map("".join)  # fmt: skip


@EQUIVALENCE
@given(st.text(alphabet="# a\tb\u00a0\u2003", max_size=24))
def test_heading_scanner_matches_the_old_pattern(line):
    m = OLD_HEADING.match(line)
    assert heading(line) == (None if m is None else (len(m.group(1)), m.group(2)))


@EQUIVALENCE
@given(markdownish)
def test_markdown_cleaner_matches_the_old_pattern(text):
    import html

    assert clean_markdown(text) == html.unescape(OLD_EMPTY_HTML.sub("", text))


@EQUIVALENCE
@given(st.text(alphabet="ab1.-@_ x%C", max_size=40))
def test_email_scanner_matches_the_old_pattern(text):
    assert email_spans(text) == [m.span() for m in OLD_EMAIL.finditer(text)]
    assert bool(EMAIL.fullmatch(text)) == bool(OLD_EMAIL.fullmatch(text))


@EQUIVALENCE
@given(st.lists(st.sampled_from(["<", ">", "/", " ", "ticket", "TICKET", "x"]), max_size=10))
def test_delimiter_pattern_matches_the_old_one(parts):
    text = "".join(parts)
    assert _DELIMITER.sub(r"[\1ticket]", text) == OLD_DELIMITER.sub(r"[\1ticket]", text)


@EQUIVALENCE
@given(st.text(alphabet="{}a", max_size=16))
def test_placeholder_scanner_matches_the_old_pattern(text):
    assert _has_placeholder(text) == bool(OLD_PLACEHOLDER.search(text))


def test_grounding_keeps_its_answers_on_real_tickets():
    text = (
        "Subject: Order #ORD-2024-8891 late\nMy Acme Pro Router (order 66120387) never came. "
        "Write to john.doe@email.com or jane_99@shop.co.uk, customer ID CUS-445566."
    )
    found = candidates(text)
    assert found["email"] == ["john.doe@email.com", "jane_99@shop.co.uk"]
    assert found["order_number"] == ["ORD-2024-8891", "66120387"]
    assert found["customer_id"] == ["CUS-445566"]
    assert "Acme Pro Router" in found["product_name"] and "jane_99" not in found["customer_id"]
