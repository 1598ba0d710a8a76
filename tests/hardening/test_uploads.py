"""Document uploads (POST /v1/docs) under pressure, on a live server with the real engine,
embedder and Milvus Lite: file names that would escape or break the upload folder are 400s
naming them, the body streams to disk instead of being held in memory (its byte limit still
counted), uploads beyond --max-concurrent-uploads get a 429, and /health keeps answering
fast while a large document is parsed, chunked and embedded."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import httpx
import pytest
from helpers import BOUNDARY, MULTIPART, live_server, multipart_body, multipart_head, wait_for

from lmstack.config import data_dir
from lmstack.serve import build_app

UPLOAD_LIMIT = 25_000_000
MARKED = {"X-Requested-With": "lmstack"}  # what the bundled page sends with uploads


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    store = tmp_path_factory.mktemp("uploads") / "docs.db"
    app = build_app(
        engine,
        "m",
        docs_store=str(store),
        max_upload_bytes=UPLOAD_LIMIT,
        max_concurrent_uploads=1,
    )
    with live_server(app) as url, httpx.Client(base_url=url, timeout=300, headers=MARKED) as http:
        yield app.state.server, http


def upload(http: httpx.Client, files: list[tuple[bytes, bytes]]) -> httpx.Response:
    body = multipart_body(files)
    return http.post("/v1/docs", content=body, headers={"Content-Type": MULTIPART})


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


@pytest.mark.parametrize(
    "name, shown, complaint",
    [
        (b"a\x00b.txt", r"'a\x00b.txt'", "control character"),
        (b"bell\x07.txt", r"'bell\x07.txt'", "control character"),
        (b"tab\tname.txt", r"'tab\tname.txt'", "control character"),
        (b"docs/notes.txt", "'docs/notes.txt'", "path separator"),
        (b"..\\..\\evil.txt", r"'..\\..\\evil.txt'", "path separator"),
        (b"..", "'..'", "empty or hidden"),
        (b"...", "'...'", "empty or hidden"),
        (b"   ", "'   '", "empty or hidden"),
        (b"x" * 252 + b".txt", "256 bytes in UTF-8, the limit is 255", "256 bytes"),
        ("é".encode() * 127 + b".md", "257 bytes in UTF-8, the limit is 255", "257 bytes"),
    ],
)
def test_bad_file_names_are_400s_that_name_them(served, name, shown, complaint):
    state, http = served
    message = error_of(upload(http, [(name, b"Cats purr when content.")]), 400)
    assert shown in message and complaint in message, message
    assert http.get("/v1/docs").json()["documents"] == []  # nothing stored


def test_a_255_byte_name_is_accepted(served):
    _, http = served
    name = "y" * 251 + ".txt"
    response = upload(http, [(name.encode(), b"Passkeys resist phishing.")])
    assert response.status_code == 200, response.text
    assert response.json()["added"] == [name]
    assert http.delete(f"/v1/docs/{name}").status_code == 200


def test_the_body_streams_to_disk_instead_of_memory(served):
    """20 MB through the upload route allocates a few MB in the server, not the 40+ MB of
    buffering the body (and its join) before the route runs."""
    _, http = served
    part = 10_000_000
    head = multipart_head(b"same.txt")
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = 2 * (len(head) + part + 2) + len(tail) - 2

    def body():  # never the whole body in the client either
        for n in range(2):
            yield (b"\r\n" if n else b"") + head
            for _ in range(part // 100_000):
                yield b"word " * 20_000
        yield tail

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        response = http.post(
            "/v1/docs",
            content=body(),
            headers={"Content-Type": MULTIPART, "Content-Length": str(length)},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Two parts with one name: refused after the body was read, before anything is ingested.
    assert "'same.txt' appears twice" in error_of(response, 400)
    assert peak < 8_000_000, f"{peak / 1e6:.1f} MB allocated for a 20 MB upload"


def test_a_streamed_upload_still_counts_its_bytes(served):
    _, http = served

    def body():  # chunked: no Content-Length for admission to refuse up front
        yield multipart_head(b"big.txt")
        for _ in range(UPLOAD_LIMIT // 1_000_000 + 2):
            yield b"w" * 1_000_000

    response = http.post("/v1/docs", content=body(), headers={"Content-Type": MULTIPART})
    message = error_of(response, 413)
    assert f"the limit is {UPLOAD_LIMIT} bytes (--max-upload-bytes)" in message


def test_uploads_beyond_the_limit_get_a_429_naming_it(served):
    state, http = served
    port = int(str(http.base_url).rsplit(":", 1)[1].strip("/"))
    head = (
        "POST /v1/docs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Requested-With: lmstack\r\n"
        f"Content-Type: {MULTIPART}\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    slow = socket.create_connection(("127.0.0.1", port))
    try:
        slow.sendall(head + multipart_head(b"slow.txt") + b"half of it")
        assert wait_for(lambda: state.uploads_running == 1, 10, 0.02)
        refused = upload(http, [(b"cats.txt", b"Cats purr when content.")])
        message = error_of(refused, 429)
        assert "the limit is 1 (--max-concurrent-uploads)" in message
        assert refused.headers["Retry-After"] == "5"
        assert http.get("/health").status_code == 200  # other routes are not held up
    finally:
        slow.close()
    assert wait_for(lambda: state.uploads_running == 0, 10, 0.02)
    again = upload(http, [(b"cats.txt", b"Cats purr when content.")])
    assert again.status_code == 200 and again.json()["added"] == ["cats.txt"], again.text
    assert http.delete("/v1/docs/cats.txt").status_code == 200


def test_health_stays_fast_while_a_large_document_is_ingested(served):
    _, http = served
    nist = data_dir() / "nist-sp800-63-3"
    text = "\n\n".join(p.read_text() for p in sorted(nist.glob("sec*.md")))
    worst, polls, done = 0.0, 0, threading.Event()

    def poll() -> None:
        nonlocal worst, polls
        with httpx.Client(base_url=http.base_url, timeout=30) as probe:
            while not done.is_set():
                started = time.monotonic()
                assert probe.get("/health").status_code == 200
                worst = max(worst, time.monotonic() - started)
                polls += 1
                time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.monotonic()
    try:
        response = upload(http, [(b"nist-all.md", text.encode())])
    finally:
        took = time.monotonic() - started
        done.set()
        poller.join(timeout=30)
    assert response.status_code == 200 and response.json()["added"] == ["nist-all.md"]
    assert response.json()["chunks"] > 30
    print(f"ingest {took:.1f} s, {polls} polls, worst /health {worst:.3f} s")
    assert took > 1.0 and polls > 10, (took, polls)  # the polls overlapped real work
    assert worst < 0.5, f"/health took {worst:.2f} s while {len(text)} chars were ingested"


def test_a_stalled_upload_gets_a_408_and_frees_its_slot(engine, tmp_path):
    app = build_app(engine, "m", docs_store=str(tmp_path / "d.db"), body_timeout=2)
    state = app.state.server
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        head = (
            "POST /v1/docs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Requested-With: lmstack\r\n"
            f"Content-Type: {MULTIPART}\r\nContent-Length: 100000\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            started = time.monotonic()
            slow.sendall(head + multipart_head(b"slow.txt") + b"and then nothing")
            answer = b""
            while chunk := slow.recv(65536):  # until the server closes
                answer += chunk
            took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        assert b"did not arrive within 2 s (--body-timeout)" in answer
        assert 1.5 < took < 6, took
        assert state.uploads_running == 0
