"""The web page end to end: headless Chromium (Debian's, driven by Playwright) against a live
server on 127.0.0.1 with the real engine, store and triage. Screenshots of each view go to
test-artifacts/. Without a browser these tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest
from helpers import ARTIFACTS, live_server, wait_for

from lmstack.config import data_dir
from lmstack.serve import build_app

pytestmark = pytest.mark.slow

NIST = data_dir() / "nist-sp800-63-3"
LONG = 180_000  # ms: generation on a shared 2-core CPU


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    store = tmp_path_factory.mktemp("ui") / "docs.db"
    with live_server(build_app(engine, "m", docs_store=str(store))) as url:
        yield url


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def console(message) -> None:
        # The page probes /rate (served with --ratings-db only) and says when it is absent.
        if message.type == "error" and not message.location.get("url", "").endswith("/rate"):
            problems.append(message.text)

    tab.on("console", console)
    tab.goto(server)
    yield tab
    context.close()
    assert not problems, problems  # no script errors and no failed requests


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def finished(reason: str) -> str:
    """The /metrics key of requests finished for `reason` (every series names the model)."""
    return f'lmstack:request_success_total{{finished_reason="{reason}",model_name="m"}}'


def scrape(server: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_chat_streams_token_by_token_and_stop_aborts_on_the_server(page, server):
    page.fill("#chat-max-tokens", "400")
    page.fill("#chat-input", "Write a long story about a robot who learns to paint.")
    page.press("#chat-input", "Enter")
    reply = page.locator(".msg.assistant .text").last
    page.wait_for_function(
        "document.querySelector('.msg.assistant .text').textContent.length > 0", timeout=LONG
    )
    first = reply.text_content()
    # More text arrives while the request is still running: it streams.
    page.wait_for_function(
        f"document.querySelector('.msg.assistant .text').textContent.length > {len(first) + 20}",
        timeout=LONG,
    )
    assert page.is_enabled("#chat-stop")
    shot(page, "chat-streaming")
    page.click("#chat-stop")
    figures = page.locator(".msg.assistant .figures").last
    page.wait_for_function(
        "document.querySelector('.msg.assistant .figures').textContent.includes('stopped')"
    )
    assert re.search(r"TTFT \d[\d,]* ms", figures.text_content())
    # Closing the stream made the server abort the engine request.
    assert wait_for(
        lambda: scrape(server).get(finished("abort"), 0) >= 1,
        timeout=10,
    )
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-seed", "1")
    page.fill("#chat-input", "Say hello.")
    page.click("#chat-send")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant .figures')[1]?.textContent.includes('tokens/s')",
        timeout=LONG,
    )
    last = page.locator(".msg.assistant .figures").nth(1).text_content()
    assert re.search(r"TTFT \d[\d,]* ms · \d+ tokens · [\d.,–]+ tokens/s", last), last
    shot(page, "chat")


def test_documents_drop_upload_and_cited_answer(page):
    page.click("#tab-docs")
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(NIST.iterdir())}
    # A real drop event carrying the report's files, as a person dragging them would send.
    page.evaluate(
        """(files) => {
            const data = new DataTransfer();
            for (const [name, text] of Object.entries(files))
                data.items.add(new File([text], name, {type: "text/markdown"}));
            const drop = document.querySelector("#drop");
            for (const type of ["dragenter", "dragover", "drop"])
                drop.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true}));
        }""",
        files,
    )
    page.wait_for_function(
        "document.querySelector('#upload-text').textContent.includes('added')", timeout=LONG
    )
    assert page.text_content("#upload-text").startswith(f"{len(files)} added")
    assert page.locator("#upload-progress").evaluate("p => p.value") == 100
    page.wait_for_function(
        f"document.querySelectorAll('#library tbody tr').length === {len(files)}"
    )
    assert "sec6_xAL.md" in page.text_content("#library")
    page.fill("#ask-question", "What does AAL3 require?")
    page.select_option("#ask-strategy", "rag")
    page.click("#ask-send")
    page.wait_for_selector("#citations li", timeout=LONG)
    assert page.locator("#answer .cite").count() >= 1
    assert "cited" in page.text_content("#ask-status")
    budget = page.text_content("#budget")
    for part in ("system", "chunks", "question", "reserve", "window"):
        assert part in budget
    shot(page, "documents")
    page.locator("#answer .cite").first.click()
    dialog = page.locator("#chunk-dialog")
    assert dialog.is_visible()
    assert len(page.text_content("#chunk-text")) > 100
    assert ".md" in page.text_content("#chunk-where")
    shot(page, "documents-citation")
    page.keyboard.press("Escape")
    assert not dialog.is_visible()


def test_triage_highlights_the_order_number(page):
    page.click("#tab-triage")
    page.click("#triage-example")
    page.click("#triage-send")
    page.wait_for_selector("#triage-results .ticket", timeout=LONG)
    card = page.locator("#triage-results .ticket").first
    marks = card.locator('mark[data-entity="order_number"]')
    assert marks.count() >= 1, card.inner_text()
    assert marks.first.inner_text().startswith("ORD-2024-8891")
    assert card.locator(".pill").first.inner_text() in {
        "Billing",
        "Technical",
        "Account",
        "Shipping",
        "Other",
    }
    assert page.is_enabled("#triage-download")
    with page.expect_download() as download:
        page.click("#triage-download")
    assert "ORD-2024-8891" in Path(download.value.path()).read_text()
    shot(page, "triage")


def test_metrics_show_the_requests_served(page, server):
    if scrape(server).get(finished("stop"), 0) == 0:
        httpx.post(  # run alone: make sure there is something to count
            f"{server}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
    page.click("#tab-metrics")
    page.wait_for_selector("#metric-requests")
    count = page.text_content("#metric-requests")
    assert int(count.replace(",", "")) > 0
    page.wait_for_timeout(3500)  # one refresh: the charts have two points
    assert page.locator("#metric-charts figure svg polyline").count() >= 5
    assert page.text_content("#metric-ttft").endswith("ms")
    shot(page, "metrics")


def test_attention_heatmaps_for_the_example_and_a_sentence(page):
    page.click("#tab-attention")
    page.wait_for_selector("#example-out .heatmap svg")
    assert page.locator("#example-out .heatmap rect").count() == 9
    page.fill("#sentence", "The cat sat on the mat.")
    page.click("#sentence-send")
    page.wait_for_selector("#sentence-out .heatmap", timeout=LONG)
    assert page.locator("#sentence-out .heatmap").count() == 9  # one per head
    page.focus("#layer")
    page.keyboard.press("End")  # keyboard: the last layer
    assert page.text_content("#layer-out") == "29"
    assert "layer 29, head 0" in page.text_content("#sentence-out")
    shot(page, "attention")


def test_keyboard_labels_and_a_narrow_screen(page):
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#tab-docs", "aria-selected") == "true"
    assert page.is_visible("#docs") and not page.is_visible("#chat")
    assert page.evaluate("document.activeElement.id") == "tab-docs"
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                         && !e.closest('label'))
            .map(e => e.id)"""
    )
    assert unlabelled == []
    page.set_viewport_size({"width": 390, "height": 844})
    for tab in ("chat", "docs", "triage", "metrics", "attention"):
        page.click(f"#tab-{tab}")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{tab} is wider than a 390 px screen by {overflow} px"
    page.click("#tab-chat")
    shot(page, "narrow-chat")


def test_a_tab_whose_app_is_not_installed_says_which_extra(browser, engine, monkeypatch):
    # pymilvus absent (import raises): the server leaves document Q&A out, the page says why
    # on its tab and loads the other apps' scripts as usual.
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with live_server(build_app(engine, "m")) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        problems: list[str] = []
        tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        tab.goto(url + "/#docs")
        tab.wait_for_selector("#docs p.status")
        text = tab.text_content("#docs")
        assert "pip install 'lmstack[docqa]' (missing: pymilvus)" in text, text
        assert tab.locator("#drop").count() == 0
        shot(tab, "docs-not-installed")
        tab.click("#tab-triage")
        tab.click("#triage-example")  # triage's script ran: its button fills the ticket
        assert tab.input_value("#triage-subject").startswith("Can't access")
        context.close()
    assert not problems, problems
