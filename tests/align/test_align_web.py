"""The /rate page end to end in headless Chromium (Debian's, driven by Playwright) against a
live uvicorn server: a rater logs in with a token, sees the prompt, both replies and the
weighted criteria, chooses with the keyboard, and the rating lands in SQLite; another
rater's token neither sees nor changes it. Without a browser the test skips, except under
CI=true, where it fails. The screenshot goes to test-artifacts/.
"""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from fastapi import FastAPI
from helpers import ARTIFACTS, live_server

from lmstack.align.api import rate_router
from lmstack.align.ratings import Comparison, RatingStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ratings(tmp_path_factory):
    path = tmp_path_factory.mktemp("rate") / "ratings.db"
    store = RatingStore(path, create=True)
    tokens = {n: store.add_rater(n) for n in ("alice", "bob", "carol")}
    tokens["admin"] = store.add_rater("admin", kind="admin")
    common = dict(prompt_id="p1", split="reward_train", kind="main")
    messages = [{"role": "user", "content": "My invoice was charged twice. What now?"}]
    store.add_comparisons(
        [
            Comparison(
                id="p1:AB",
                messages=messages,
                a_text="We are sorry! Refund issued for the duplicate charge today.",
                b_text="Dear valued customer, we acknowledge receipt of your message.",
                a_label="A",
                b_label="B",
                **common,
            ),
            Comparison(
                id="p1:AC",
                messages=messages,
                a_text="Refund issued.",
                b_text="Please contact support.",
                a_label="A",
                b_label="C",
                **common,
            ),
        ]
    )
    store.assign([("p1:AB", "alice", "primary"), ("p1:AC", "bob", "primary")])
    store.close()
    return path, tokens


@pytest.fixture(scope="module")
def server(ratings):
    app = FastAPI()
    app.include_router(rate_router(ratings[0]))
    with live_server(app) as url:
        yield url


def _rows(path):
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT comparison_id, rater, choice FROM ratings").fetchall()


def test_rater_logs_in_sees_criteria_rates_by_keyboard_and_others_cannot_touch_it(
    browser, server, ratings
):
    db, tokens = ratings
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    page.goto(server + "/rate")
    page.fill("#token", "not-a-token")
    page.press("#token", "Enter")
    page.wait_for_function("document.getElementById('login-error').textContent.length > 0")
    assert "unknown rater token" in page.text_content("#login-error")
    assert _rows(db) == []

    page.fill("#token", tokens["alice"])
    page.press("#token", "Enter")
    page.wait_for_selector("#rating:not([hidden])")
    assert "charged twice" in page.text_content("#prompt")
    assert "Refund issued for the duplicate" in page.text_content("#a")
    assert "acknowledge receipt" in page.text_content("#b")
    criteria = page.text_content("#criteria")
    for name, weight in [
        ("Appropriateness of tone", 40),
        ("Specificity", 30),
        ("Conciseness", 20),
        ("Professionalism", 10),
    ]:
        assert f"{name} ({weight}%)" in criteria
    page.screenshot(path=str(ARTIFACTS / "align-rate.png"), full_page=True)

    page.keyboard.press("a")  # keyboard choice: A is better
    page.wait_for_selector("#done:not([hidden])")
    assert _rows(db) == [("p1:AB", "alice", "A")]

    # Bob's token: his own queue only, no view of Alice's rating, no way to change it.
    bob = {"Authorization": f"Bearer {tokens['bob']}"}
    nxt = httpx.get(server + "/rate/api/next", headers=bob).json()
    assert nxt["rater"] == "bob" and nxt["comparison"]["id"] == "p1:AC"
    assert httpx.get(server + "/rate/api/mine", headers=bob).json()["ratings"] == {}
    steal = httpx.post(
        server + "/rate/api/ratings", headers=bob, json={"comparison_id": "p1:AB", "choice": "B"}
    )
    assert steal.status_code == 404 and "not assigned to bob" in steal.text
    unknown = httpx.post(
        server + "/rate/api/ratings", headers=bob, json={"comparison_id": "nope", "choice": "A"}
    )
    assert unknown.status_code == 404
    wrong = httpx.post(
        server + "/rate/api/ratings",
        headers={"Authorization": "Bearer wrong"},
        json={"comparison_id": "p1:AC", "choice": "A"},
    )
    assert wrong.status_code == 401
    assert _rows(db) == [("p1:AB", "alice", "A")]

    # QC needs the admin token; a rater's token is refused.
    assert httpx.get(server + "/rate/qc", headers=bob).status_code == 403
    qc = httpx.get(server + "/rate/qc", headers={"Authorization": f"Bearer {tokens['admin']}"})
    assert qc.status_code == 200 and qc.json()["raters"]["alice"]["ratings"] == 1
    context.close()
    assert not problems, problems
