"""Admission covers every route, not only /v1: the body limit on the page, probes and the
rating API, the drain on /rate/api too, the rating note's length limit, and uvicorn's
connection limit; on a live server with the real engine and a real ratings.db."""

from __future__ import annotations

import socket

import httpx
import pytest
from helpers import live_server, make_ratings_db, wait_for

from lmstack.serve import build_app

NOTE_LIMIT = 50


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("admission")
    tokens = make_ratings_db(folder / "ratings.db")
    app = build_app(
        engine,
        "m",
        max_body_bytes=10_000,
        docs_store=str(folder / "docs.db"),
        ratings_db=folder / "ratings.db",
        max_note_chars=NOTE_LIMIT,
    )
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield app.state.server, http, tokens


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/rate/api/ratings"),
        ("GET", "/rate/api/next"),
        ("GET", "/health"),
        ("GET", "/"),
        ("GET", "/static/app.js"),
        ("POST", "/nowhere"),
    ],
)
def test_the_body_limit_covers_every_route(served, method, path):
    _, http, tokens = served
    auth = {"Authorization": f"Bearer {tokens['alice']}", "Content-Type": "application/json"}
    body = b'{"note": "' + b"x" * 20_000 + b'"}'
    message = error_of(http.request(method, path, content=body, headers=auth), 413)
    assert "the limit is 10000 bytes (--max-body-bytes)" in message

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"note": "'
        for _ in range(5):
            yield b"x" * 5_000

    response = http.request(method, path, content=chunked(), headers=auth)
    assert "(--max-body-bytes)" in error_of(response, 413)


def test_a_rating_note_longer_than_the_limit_is_a_400(served):
    _, http, tokens = served
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    long = {"comparison_id": "p1:B", "choice": "A", "note": "n" * (NOTE_LIMIT + 1)}
    message = error_of(http.post("/rate/api/ratings", json=long, headers=auth), 400)
    assert message == f"note is {NOTE_LIMIT + 1} characters, the limit is 50 (--max-note-chars)"
    fits = {**long, "note": "n" * NOTE_LIMIT}
    assert http.post("/rate/api/ratings", json=fits, headers=auth).status_code == 200
    assert http.get("/rate/api/mine", headers=auth).json()["ratings"] == {"p1:B": "A"}


def test_the_drain_refuses_rating_writes_too(served):
    state, http, tokens = served
    auth = {"Authorization": f"Bearer {tokens['bob']}"}
    state.draining = True
    try:
        rating = {"comparison_id": "p1:C", "choice": "B"}
        refused = http.post("/rate/api/ratings", json=rating, headers=auth)
        assert "shutting down" in error_of(refused, 503)
        assert http.get("/health").status_code == 200  # probes still answer
        assert http.get("/ready").status_code == 503
    finally:
        state.draining = False
    assert http.post("/rate/api/ratings", json=rating, headers=auth).status_code == 200


def test_connections_beyond_the_limit_get_503(engine):
    with live_server(build_app(engine, "m"), limit_concurrency=3) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            with httpx.Client(base_url=url, timeout=10) as http:
                assert wait_for(lambda: http.get("/health").status_code == 503, 5)
        finally:
            for sock in idle:
                sock.close()
        assert wait_for(lambda: httpx.get(url + "/health").status_code == 200, 5)
