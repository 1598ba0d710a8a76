"""Test helpers: the CLI in-process, and a real uvicorn server on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

# helpers.py stays at tests/, so this holds wherever a test module sits below it.
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"  # screenshots of the browser tests (ignored by git)
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright never downloads a browser here
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def live_server(app, host: str = "127.0.0.1", **options):
    """Serve `app` with uvicorn on a free port of `host` in a thread; yields the base URL.

    uvicorn is configured as `lmstack serve` configures it; `options` are uvicorn_config's
    (header_timeout, keep_alive_timeout, limit_concurrency).
    """
    import uvicorn

    from lmstack.server.cli import uvicorn_config

    sock = socket.socket()
    sock.bind((host, 0))
    config = uvicorn_config(app, log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def within(limit_s: float, fn, *args):
    """fn(*args), asserting it took under limit_s seconds (best of two: a busy machine may
    stall one run; a super-linear function misses by minutes on a megabyte, not by a hair)."""
    for _attempt in range(2):
        start = time.perf_counter()
        result = fn(*args)
        took = time.perf_counter() - start
        if took < limit_s:
            return result
    size = f"{len(args[0]):,} characters" if args and isinstance(args[0], str) else repr(args[0])
    raise AssertionError(f"{getattr(fn, '__name__', fn)} took {took:.2f} s on {size}")


def stop_process(proc, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; reaped either way."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_process(args: list[str], log, ready_timeout: float = 120):
    """`lmstack serve ARGS` in a child process on a free port, stderr to `log` (an open
    file); returns (process, url) once /ready answers 200. The caller stops the process."""
    import subprocess
    import sys

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "lmstack.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())

    def ready() -> bool:
        assert proc.poll() is None, "server exited during start-up"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/ready").status_code == 200
        return False

    try:
        assert wait_for(ready, ready_timeout, 0.3), "server never became ready"
    except BaseException:
        proc.kill()
        raise
    return proc, url


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `lmstack ARGS` in-process: (exit code, stdout, stderr)."""
    from lmstack.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def make_pdf(pages: list[str | None]) -> bytes:
    """A minimal, valid PDF with one line of Helvetica text per page (offsets computed); a
    page given as None only paints an image, as a scan without a text layer does."""
    return pdf_of_streams(
        [None if text is None else f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET" for text in pages]
    )


def make_table_pdf(intro: str, rows: list[list[str]], column_width: int = 150) -> bytes:
    """One page: a sentence, then a table whose cells are drawn one by one at their column's
    x and their row's y, as report generators draw them."""
    ops = [f"BT /F1 12 Tf 72 760 Td ({intro}) Tj ET"]
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            ops.append(f"BT /F1 11 Tf {72 + column_width * c} {720 - 20 * r} Td ({cell}) Tj ET")
    return pdf_of_streams(["\n".join(ops)])


def pdf_of_streams(streams: list[str | None]) -> bytes:
    """A PDF whose pages draw these content streams (Helvetica as /F1); None: a page that
    only paints a 1x1 grey image (/Im1)."""
    image = "<< /Type /XObject /Subtype /Image /Width 1 /Height 1 /ColorSpace /DeviceGray "
    image += "/BitsPerComponent 8 /Filter /ASCIIHexDecode /Length 3 >>\nstream\n80>\nendstream"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{5 + 2 * i} 0 R" for i in range(len(streams)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(streams)} >>")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    objects.append(image)
    for i, stream in enumerate(streams):
        stream = "q 200 0 0 200 72 500 cm /Im1 Do Q" if stream is None else stream
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font "
            f"<< /F1 3 0 R >> /XObject << /Im1 4 0 R >> >> /Contents {6 + 2 * i} 0 R >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    return pdf_of_objects([o.encode() for o in objects])


def pdf_of_objects(objects: list[bytes]) -> bytes:
    """A PDF file of these objects (numbered from 1, the first the catalog), with its xref."""
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    return out


def encrypt_pdf(data: bytes, user_password: str, owner_password: str, algorithm: str) -> bytes:
    """`data` encrypted by pypdf (algorithm: RC4-40, RC4-128, AES-128 or AES-256)."""
    import io

    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(data)).pages:
        writer.add_page(page)
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_with_body(body_xml: str | bytes) -> bytes:
    """A DOCX (python-docx's default template) whose <w:body> holds `body_xml`: for
    documents python-docx cannot write (a text box, a 100,000-cell table in seconds)."""
    import io
    import zipfile

    import docx

    template = io.BytesIO()
    docx.Document().save(template)
    body = body_xml.encode() if isinstance(body_xml, str) else body_xml
    out = io.BytesIO()
    with zipfile.ZipFile(template) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "word/document.xml":
                head = data[: data.index(b"<w:body>") + len(b"<w:body>")]
                data = head + body + b"</w:body></w:document>"
            dst.writestr(item.filename, data)
    return out.getvalue()


@contextlib.contextmanager
def chromium():
    """Headless Chromium driven by Playwright. Without one the test skips; under CI=true it
    fails, because CI (.ci/run) installs the browser and must run these tests."""
    import pytest

    def missing(why: str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: CI must run the browser tests (.ci/run installs chromium)")
        pytest.skip(why)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


BOUNDARY = "lmstack-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_head(filename: bytes, field: str = "files") -> bytes:
    """One file part's head with `filename` as raw bytes: no client escapes or strips it."""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="'.encode()
        + filename
        + b'"\r\nContent-Type: text/plain\r\n\r\n'
    )


def multipart_body(files: list[tuple[bytes, bytes]]) -> bytes:
    """A multipart/form-data body (Content-Type: MULTIPART) of (raw filename, data) parts."""
    out = b"".join(multipart_head(name) + data + b"\r\n" for name, data in files)
    return out + f"--{BOUNDARY}--\r\n".encode()


def make_ratings_db(path: Path) -> dict[str, str]:
    """A ratings.db with raters alice and bob, one comparison each: {name: token}."""
    from lmstack.align.ratings import Comparison, RatingStore

    store = RatingStore(path, create=True)
    tokens = {name: store.add_rater(name) for name in ("alice", "bob")}
    messages = [{"role": "user", "content": "My invoice was charged twice. What now?"}]
    common = dict(prompt_id="p1", split="reward_train", kind="main", messages=messages)
    store.add_comparisons(
        [
            Comparison(
                id=f"p1:{x}", a_text="Refunded.", b_text="Wait.", a_label="A", b_label=x, **common
            )  # fmt: skip
            for x in ("B", "C")
        ]
    )
    store.assign([("p1:B", "alice", "primary"), ("p1:C", "bob", "primary")])
    store.close()
    return tokens
