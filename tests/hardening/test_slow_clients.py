"""Slow clients against a real `lmstack serve` subprocess with short timeouts: 40 raw sockets
trickle a request head or a body one byte every 0.5 s (slowloris), and a few connect and
send nothing. Meanwhile a normal client's /health and a small chat completion answer within
a bound, and every slow one is dropped: a head past --header-timeout is closed, a body past
--body-timeout gets a 408 and is closed."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from helpers import serve_process, stop_process, wait_for

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 4.0
BODY_TIMEOUT = 5.0
SLACK = 3.0  # a dropped client is noticed within one trickle step, on a busy 2-core machine
TRICKLE_S = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow")
    args = ["--kv-cache-gb", "0.05", "--docs-store", str(folder / "docs.db")]
    args += ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)]
    args += ["--keep-alive-timeout", "2", "--log-level", "warning"]
    log = open(folder / "stderr.log", "w+")  # noqa: SIM115  (read back on failure)
    proc, url = serve_process(args, log)
    try:
        yield int(url.rsplit(":", 1)[1]), url
    finally:
        stop_process(proc)
        log.close()


class Trickler:
    """One raw connection that sends `data` one byte per step and notes when it is dropped."""

    def __init__(self, port: int, data: bytes, first: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.data, self.sent, self.received = data, 0, b""
        self.started = time.monotonic()
        self.closed_after: float | None = None
        if first:
            self.sock.sendall(first)

    def step(self) -> None:
        if self.closed_after is not None:
            return
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self._closed()  # recv returned b"": the server closed the connection
            return
        except BlockingIOError:
            pass
        except OSError:
            self._closed()
            return
        if self.sent < len(self.data):
            try:
                self.sock.send(self.data[self.sent : self.sent + 1])
                self.sent += 1
            except OSError:
                self._closed()

    def _closed(self) -> None:
        self.closed_after = time.monotonic() - self.started
        self.sock.close()


def test_trickling_clients_are_dropped_and_never_block_others(server):
    port, url = server
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 300\r\n\r\n"
    ).encode()
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * 300
    heads = [Trickler(port, head) for _ in range(20)]
    bodies = [Trickler(port, body, first=head) for _ in range(20)]
    silent = [Trickler(port, b"") for _ in range(3)]
    everyone = heads + bodies + silent
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set() and any(t.closed_after is None for t in everyone):
            for t in everyone:
                t.step()
            time.sleep(TRICKLE_S)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        worst = 0.0
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() - heads[0].started < HEADER_TIMEOUT - 1:
                started = time.monotonic()
                assert http.get("/health").status_code == 200
                worst = max(worst, time.monotonic() - started)
                time.sleep(0.1)
            started = time.monotonic()
            chat = http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            )
            chat_s = time.monotonic() - started
        assert chat.status_code == 200, chat.text
        assert worst < 1.0, f"/health took {worst:.2f} s beside 40 trickling clients"
        assert chat_s < 30, f"a small chat completion took {chat_s:.1f} s"
        assert wait_for(
            lambda: all(t.closed_after is not None for t in everyone),
            BODY_TIMEOUT + 2 * SLACK,
            0.2,
        ), [t.closed_after for t in everyone]
    finally:
        stop.set()
        thread.join(timeout=10)
        for t in everyone:
            t.sock.close()
    for t in heads + silent:  # closed at the head deadline, without an answer
        assert HEADER_TIMEOUT - 0.5 <= t.closed_after <= HEADER_TIMEOUT + SLACK, t.closed_after
        assert t.received == b""
        assert t in silent or t.sent < len(head)  # still trickling when it was dropped
    for t in bodies:  # a 408 naming the flag, then closed
        assert BODY_TIMEOUT - 0.5 <= t.closed_after <= BODY_TIMEOUT + SLACK, t.closed_after
        assert t.received.startswith(b"HTTP/1.1 408 "), t.received[:200]
        assert b"(--body-timeout)" in t.received and b"connection: close" in t.received.lower()
        assert t.sent < len(body)
    assert httpx.get(url + "/health").status_code == 200
