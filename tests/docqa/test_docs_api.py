"""Document, attention and web-page endpoints on a live `lmstack serve` app (real engine,
real Milvus Lite store, real embedder), driven over HTTP with httpx."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from helpers import live_server, make_pdf

from lmstack.config import data_dir
from lmstack.serve import build_app

NIST = data_dir() / "nist-sp800-63-3"
UPLOAD_LIMIT = 100_000  # small, so the 413 test sends little
QUESTION = "What does AAL3 require?"


@pytest.fixture(scope="module")
def http(engine, tmp_path_factory):
    store = tmp_path_factory.mktemp("docs") / "docs.db"
    app = build_app(engine, "m", docs_store=str(store), max_upload_bytes=UPLOAD_LIMIT)
    # The header the bundled page sends: uploads and deletes need it (cross-site defence).
    marked = {"X-Requested-With": "lmstack"}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=300, headers=marked) as client:
        yield client


@pytest.fixture(scope="module")
def uploaded(http):
    """The store after one upload: two NIST sections and a file that is not a PDF."""
    names = ("sec6_xAL.md", "sec7_tofedornottofed.md")
    files = [("files", (name, (NIST / name).read_bytes())) for name in names]
    files.append(("files", ("broken.pdf", b"%PDF-1.4 this is not a PDF")))
    response = http.post("/v1/docs", files=files)
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"]  # OpenAI's error shape
    return body["error"]["message"]


def test_page_and_its_scripts_are_served(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for tab in ("Chat", "Documents", "Triage", "Metrics", "Attention"):
        assert f">{tab}</button>" in page.text
    assert 'href="/rate"' in page.text
    # Every stylesheet, script and module import the page names is served: nothing external.
    assert not re.search(r"""(src|href)=["']https?://""", page.text)
    pending = re.findall(r"""(?:src|href)="(/static/[^"]+)\"""", page.text)
    seen = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        asset = http.get(path)
        assert asset.status_code == 200, path
        folder = path.rpartition("/")[0]
        for target in re.findall(r"""from "((?:\./|/static/)[\w./]+)";""", asset.text):
            pending.append(folder + target[1:] if target.startswith("./") else target)
    # The shell's scripts, and each app's from its own folder (named in the page's JSON).
    shell = {"/static/app.js", "/static/chat.js", "/static/common.js", "/static/metrics.js"}
    assert shell | {"/static/docqa/docs.js", "/static/triage/triage.js"} <= seen
    apps = re.search(r'<script type="application/json" id="page-apps">(.*?)</script>', page.text)
    parts = json.loads(apps.group(1))["parts"]
    assert {p["script"] for p in parts} == {"/static/docqa/docs.js", "/static/triage/triage.js"}


def test_an_empty_store_is_a_400_that_says_so(engine, tmp_path):
    app = build_app(engine, "m", docs_store=str(tmp_path / "empty.db"))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        library = client.get("/v1/docs").json()
        assert library["documents"] == [] and library["chunks"] == 0
        message = error_of(client.post("/v1/ask", json={"question": QUESTION}), 400)
        assert "holds no documents" in message and "POST /v1/docs" in message
        search = client.post("/v1/docs/search", json={"query": "AAL3"})
        assert "holds no documents" in error_of(search, 400)


def test_upload_reports_every_file_and_the_library_lists_them(http, uploaded):
    assert uploaded["added"] == ["sec6_xAL.md", "sec7_tofedornottofed.md"]
    assert uploaded["files"][-1] == "broken.pdf"
    # The failure names the file as uploaded, not the server's temporary path.
    assert uploaded["failed"] == [{"path": "broken.pdf", "error": uploaded["failed"][0]["error"]}]
    assert uploaded["failed"][0]["error"].startswith("broken.pdf: ")
    library = http.get("/v1/docs").json()
    docs = {d["doc_id"]: d for d in library["documents"]}
    assert set(docs) == {"sec6_xAL.md", "sec7_tofedornottofed.md"}
    assert library["chunks"] == uploaded["chunks"] == sum(d["chunks"] for d in docs.values())
    assert library["tokens"] == uploaded["tokens"] > 1000
    again = http.post(
        "/v1/docs",
        files=[
            ("files", ("sec7_tofedornottofed.md", (NIST / "sec7_tofedornottofed.md").read_bytes()))
        ],
    )
    assert again.json()["unchanged"] == ["sec7_tofedornottofed.md"]  # same content: no re-index


def test_bad_uploads_are_400s_and_large_ones_413_naming_the_limit(http, uploaded):
    only_bad = http.post("/v1/docs", files=[("files", ("x.pdf", b"not a pdf"))])
    assert "no file could be ingested: x.pdf" in error_of(only_bad, 400)
    assert "multipart/form-data" in error_of(http.post("/v1/docs", json={"a": 1}), 400)
    # multipart with a field but no file (a urlencoded form is a 415: see tests/hardening)
    empty_form = http.post("/v1/docs", files=[("note", (None, b"no files"))])
    assert "holds no files" in error_of(empty_form, 400)
    big = http.post("/v1/docs", files=[("files", ("big.txt", b"word " * 30_000))])
    message = error_of(big, 413)
    assert f"the limit is {UPLOAD_LIMIT} bytes (--max-upload-bytes)" in message
    # Other /v1 routes keep --max-body-bytes (1 MB), whatever the upload limit.
    huge_chat = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x" * 1_100_000}]},
    )
    assert "(--max-body-bytes)" in error_of(huge_chat, 413)
    assert len(http.get("/v1/docs").json()["documents"]) == 2  # nothing stored by the failures


def test_search_validates_and_returns_ranked_hits(http, uploaded):
    zero = http.post("/v1/docs/search", json={"query": "AAL3", "top_k": 0})
    assert error_of(zero, 400) == "top_k must be from 1 to 100, got 0"
    mode = http.post("/v1/docs/search", json={"query": "AAL3", "mode": "fuzzy"})
    assert "mode must be one of hybrid, dense, bm25, got 'fuzzy'" in error_of(mode, 400)
    assert "query is empty" in error_of(http.post("/v1/docs/search", json={"query": " "}), 400)
    hits = http.post(
        "/v1/docs/search", json={"query": "authenticator assurance level 3", "top_k": 3}
    ).json()
    assert len(hits) == 3
    assert set(hits[0]) == {"doc_id", "chunk_id", "title", "page", "score", "text"}
    assert hits[0]["doc_id"] == "sec6_xAL.md"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_ask_answers_with_citations_and_budget(http, uploaded):
    strategy = http.post("/v1/ask", json={"question": QUESTION, "strategy": "magic"})
    assert "strategy must be one of rag, map-reduce, refine, sliding, got 'magic'" in error_of(
        strategy, 400
    )
    assert "from 1 to 500" in error_of(
        http.post("/v1/ask", json={"question": QUESTION, "max_tokens": 0}), 400
    )
    answer = http.post("/v1/ask", json={"question": QUESTION, "max_tokens": 40}).json()
    assert answer["strategy"] == "rag" and not answer["abstained"]
    assert answer["citations"], answer
    cited = answer["citations"][0]
    assert f"[{cited['n']}]" in answer["answer"]
    assert cited["doc_id"] in {"sec6_xAL.md", "sec7_tofedornottofed.md"} and cited["text"]
    budget = answer["budget"]
    assert (
        budget["system"] + budget["chunks"] + budget["question"] + budget["template"]
        == (budget["prompt"])
    )
    assert budget["total"] <= budget["window"]


@pytest.mark.slow
def test_ask_streams_deltas_then_the_checked_answer(http, uploaded):
    body = {"question": QUESTION, "max_tokens": 40, "stream": True}
    with http.stream("POST", "/v1/ask", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    deltas = [json.loads(e)["delta"] for e in events[:-2]]
    assert len(deltas) > 3
    assert set(final) >= {"answer", "citations", "budget"}
    # The streamed text is the model's; the final answer is it with citations checked.
    words = re.sub(r"\s*\[\d+(, \d+)*\]", "", final["answer"]).split()
    assert words[:3] == re.sub(r"\s*\[\d+(, \d+)*\]", "", "".join(deltas)).split()[:3]


def test_pdf_hits_and_citations_carry_their_page(http, uploaded):
    pdf = make_pdf(["Cats purr when content.", "Passkeys are phishing resistant authenticators."])
    report = http.post("/v1/docs", files=[("files", ("pages.pdf", pdf))]).json()
    assert report["added"] == ["pages.pdf"]
    try:
        hits = http.post(
            "/v1/docs/search", json={"query": "phishing resistant passkeys", "mode": "bm25"}
        ).json()
        assert (hits[0]["doc_id"], hits[0]["page"]) == ("pages.pdf", 2)
    finally:
        assert http.delete("/v1/docs/pages.pdf").status_code == 200


def test_the_api_key_guards_the_document_routes_but_not_the_page(engine, tmp_path):
    app = build_app(engine, "m", api_key="sesame", docs_store=str(tmp_path / "k.db"))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        assert error_of(client.get("/v1/docs"), 401).startswith("invalid or missing API key")
        keyed = client.get("/v1/docs", headers={"Authorization": "Bearer sesame"})
        assert keyed.status_code == 200 and keyed.json()["documents"] == []


def test_delete_removes_a_document_and_names_an_unknown_one(http, uploaded):
    message = error_of(http.delete("/v1/docs/nothing.md"), 404)
    assert "no document 'nothing.md'" in message
    before = {d["doc_id"]: d["chunks"] for d in http.get("/v1/docs").json()["documents"]}
    gone = http.delete("/v1/docs/sec7_tofedornottofed.md")
    assert gone.json() == {
        "deleted": "sec7_tofedornottofed.md",
        "chunks": before["sec7_tofedornottofed.md"],
    }
    ids = [d["doc_id"] for d in http.get("/v1/docs").json()["documents"]]
    assert ids == ["sec6_xAL.md"]


def test_attention_weights_for_every_layer_and_head(http):
    data = http.post("/v1/attention", json={"text": "The cat sat on the mat."}).json()
    tokens = data["tokens"]
    assert tokens[:3] == ["The", "cat", "sat"] and data["causal"] is True
    weights = data["weights"]
    assert (len(weights), len(weights[0])) == (data["layers"], data["heads"]) == (30, 9)
    for layer in (0, 29):
        for row_number, row in enumerate(weights[layer][4]):
            assert len(row) == len(tokens)
            assert sum(row) == pytest.approx(1.0, abs=1e-3)
            assert all(w == 0 for w in row[row_number + 1 :])  # causal: no future tokens
    long = http.post("/v1/attention", json={"text": "word " * 40})
    assert "at most 32" in error_of(long, 400)


def test_attention_worked_example_matches_the_hand_computation(http):
    data = http.post("/v1/attention", json={}).json()
    assert data["tokens"] == ["The", "cat", "sat"] and data["heads"] == 1
    # X X^T / sqrt(4): "The" scores 1 against itself, 0 with "cat", 0.5 with "sat".
    assert data["steps"]["scaled"][0] == [1.0, 0.0, 0.5]
    assert data["weights"][0][0][0] == pytest.approx([0.5065, 0.1863, 0.3072], abs=1e-4)
    bad = http.post("/v1/attention", json={"heads": 3})
    assert "heads must divide the example's width 4 ([1, 2, 4]), got 3" in error_of(bad, 400)
