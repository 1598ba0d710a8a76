"""Cross-site requests against a live server (real engine, store and ratings.db): a request a
page on another site could send (simple content types, another Origin, a rebinding Host) is
refused before any route runs, in OpenAI's error shape; what the bundled pages and OpenAI
clients send still passes. An empty API key is a start-up error, and with a key /metrics
needs it unless --metrics-public. The last test has headless Chromium try it for real."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from helpers import MULTIPART, chromium, live_server, make_ratings_db, multipart_body, run_cli

from lmstack.errors import InputError
from lmstack.serve import build_app

ALLOWED = "https://chat.example.com"
MARKED = {"X-Requested-With": "lmstack"}
STATE_CHANGING = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/ask"),
    ("POST", "/v1/docs/search"),
    ("POST", "/v1/triage"),
    ("POST", "/v1/attention"),
    ("POST", "/v1/docs"),
    ("DELETE", "/v1/docs/report.md"),
    ("POST", "/rate/api/ratings"),
]


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cross-site")
    tokens = make_ratings_db(folder / "ratings.db")
    app = build_app(
        engine,
        "m",
        docs_store=str(folder / "docs.db"),
        allowed_origin=[ALLOWED],
        ratings_db=folder / "ratings.db",
    )
    with live_server(app) as url:
        yield url, tokens


def error_of(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert code is None or body["error"]["code"] == code, body
    return body["error"]["message"]


@pytest.mark.parametrize("method, path", STATE_CHANGING)
@pytest.mark.parametrize(
    "kind", [None, "text/plain", "application/x-www-form-urlencoded", MULTIPART]
)
def test_what_a_form_on_another_site_can_send_is_a_415(server, method, path, kind):
    url, _ = server
    headers = {} if kind is None else {"Content-Type": kind}
    body = b'{"messages": [{"role": "user", "content": "hi"}], "question": "hi"}'
    response = httpx.request(method, url + path, content=body, headers=headers)
    message = error_of(response, 415, "unsupported_media_type")
    assert f"{method} {path} takes 'Content-Type: application/json'" in message
    assert "X-Requested-With: lmstack" in message
    assert (repr(kind) if kind else "no Content-Type") in message


def test_what_the_pages_and_openai_clients_send_passes(server):
    url, tokens = server
    with httpx.Client(base_url=url, timeout=120) as http:
        search = http.post("/v1/docs/search", json={"query": "AAL3"})
        assert "holds no documents" in error_of(search, 400)  # the route ran
        gone = http.delete("/v1/docs/report.md", headers=MARKED)  # no body: the header
        assert "no document 'report.md'" in error_of(gone, 404)
        # multipart with the header reaches the route, which judges the file name
        upload = http.post(
            "/v1/docs",
            content=multipart_body([(b".hidden", b"text")]),
            headers={"Content-Type": MULTIPART, **MARKED},
        )
        assert "is empty or hidden" in error_of(upload, 400)
        chat = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            headers={"Origin": url},  # the bundled page's own origin
        )
        assert chat.status_code == 200, chat.text
        rating = http.post(
            "/rate/api/ratings",
            json={"comparison_id": "p1:B", "choice": "A"},
            headers={"Authorization": f"Bearer {tokens['alice']}", "Origin": url},
        )
        assert rating.status_code == 200, rating.text
        # GETs need no content type
        assert http.get("/v1/docs").status_code == 200


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://localhost:1", "https://127.0.0.1", "file://"],
)
def test_another_origin_is_a_403_naming_the_flag(server, origin):
    url, _ = server
    for method, path, kwargs in [
        ("POST", "/v1/completions", {"json": {"prompt": "Hi", "max_tokens": 1}}),
        ("GET", "/v1/docs", {}),
        ("DELETE", "/v1/docs/report.md", {"headers": MARKED}),
    ]:
        headers = {"Origin": origin, **kwargs.pop("headers", {})}
        response = httpx.request(method, url + path, headers=headers, **kwargs)
        message = error_of(response, 403, "origin_not_allowed")
        assert f"Origin {origin!r}" in message and "--allowed-origin" in message
        if origin.startswith("http"):
            assert f"--allowed-origin {origin}" in message


def test_the_served_origin_its_aliases_and_allowed_origins_pass(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    body = {"query": "AAL3"}
    for origin in [url, f"http://localhost:{port}", f"http://[::1]:{port}", ALLOWED]:
        response = httpx.post(url + "/v1/docs/search", json=body, headers={"Origin": origin})
        assert "holds no documents" in error_of(response, 400), origin
    # The allowed site's page gets through its preflight (CORS); another site's does not.
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    granted = httpx.options(url + "/v1/ask", headers={"Origin": ALLOWED, **ask})
    assert granted.status_code == 200
    assert granted.headers["access-control-allow-origin"] == ALLOWED
    denied = httpx.options(url + "/v1/ask", headers={"Origin": "http://evil.example", **ask})
    assert "access-control-allow-origin" not in denied.headers
    assert denied.status_code >= 400


@pytest.mark.parametrize("path", ["/v1/models", "/", "/health", "/rate/api/next"])
def test_a_rebinding_host_is_a_403(server, path):
    url, _ = server
    response = httpx.get(url + path, headers={"Host": "attacker.example:8000"})
    message = error_of(response, 403, "host_not_allowed")
    assert "Host 'attacker.example:8000'" in message and "--allowed-origin" in message


def test_names_of_this_server_pass_as_host(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    for host in [f"localhost:{port}", f"127.0.0.1:{port}", "chat.example.com", "10.1.2.3:80"]:
        response = httpx.get(url + "/v1/models", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if not loopback."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_on_another_interface_any_host_name_passes_and_origin_is_still_checked(engine):
    # Behind a proxy or a Kubernetes Service the Host is a name this server cannot know.
    address = outward_address()
    if address is None:
        pytest.skip("no non-loopback interface")
    with live_server(build_app(engine, "m"), host=address) as url:
        port = url.rsplit(":", 1)[1]
        named = {"Host": f"lmstack.default.svc:{port}"}
        assert httpx.get(url + "/v1/models", headers=named).status_code == 200
        same_site = {**named, "Origin": f"http://lmstack.default.svc:{port}"}
        body = {"prompt": "Hi", "max_tokens": 1}
        assert httpx.post(url + "/v1/completions", json=body, headers=same_site).is_success
        other = {**named, "Origin": "http://evil.example"}
        response = httpx.post(url + "/v1/completions", json=body, headers=other)
        error_of(response, 403, "origin_not_allowed")


def test_an_empty_api_key_is_a_start_up_error(engine, capsys, monkeypatch):
    with pytest.raises(InputError, match="--api-key is empty"):
        build_app(engine, "m", api_key="")
    code, _, err = run_cli(["serve", "--api-key", ""], capsys)
    assert code != 0 and "--api-key is empty" in err
    monkeypatch.setenv("LMSTACK_API_KEY", "")
    code, _, err = run_cli(["serve"], capsys)
    assert code != 0 and "--api-key is empty" in err


def test_with_a_key_metrics_need_it_unless_public(engine):
    with live_server(build_app(engine, "m", api_key="sesame")) as url:
        message = error_of(httpx.get(url + "/metrics"), 401, "invalid_api_key")
        assert "--metrics-public" in message
        keyed = httpx.get(url + "/metrics", headers={"Authorization": "Bearer sesame"})
        assert keyed.status_code == 200 and "lmstack:" in keyed.text
        assert httpx.get(url + "/health").status_code == 200  # probes stay open
    with live_server(build_app(engine, "m", api_key="sesame", metrics_public=True)) as url:
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401


@pytest.mark.slow
def test_a_page_on_another_origin_cannot_upload_or_ask(server, caplog):
    """Chromium on another origin sends what it may without asking (a form POST of a file,
    text/plain JSON) and what it must preflight; nothing lands in the store."""
    url, _ = server
    evil = FastAPI()

    @evil.get("/")
    async def page():
        return HTMLResponse("<!doctype html><title>elsewhere</title><p>hi</p>")

    caplog.set_level(logging.INFO, logger="lmstack.server")
    script = """async (target) => {
      const out = [];
      const form = new FormData();
      form.append("files", new Blob(["Cats purr when content."], {type: "text/plain"}), "cats.txt");
      const attempts = [
        ["/v1/docs", {method: "POST", body: form, mode: "no-cors"}],
        ["/v1/ask", {method: "POST", body: '{"question": "x"}', mode: "no-cors",
                     headers: {"Content-Type": "text/plain"}}],
        ["/v1/ask", {method: "POST", body: '{"question": "x"}',
                     headers: {"Content-Type": "application/json"}}],
        ["/v1/docs/cats.txt", {method: "DELETE", headers: {"X-Requested-With": "lmstack"}}],
      ];
      for (const [path, init] of attempts) {
        try { const r = await fetch(target + path, init); out.push(r.type); }
        catch (e) { out.push("blocked"); }
      }
      return out;
    }"""
    with live_server(evil) as elsewhere, chromium() as browser:
        page = browser.new_page()
        page.goto(elsewhere)
        outcomes = page.evaluate(script, url)
    # The simple requests went out (opaque answers); the others died at the preflight.
    assert outcomes == ["opaque", "opaque", "blocked", "blocked"], outcomes
    assert httpx.get(url + "/v1/docs").json()["documents"] == []
    refused = [r.getMessage() for r in caplog.records if '"status": 403' in r.getMessage()]
    assert sum('"path": "/v1/docs"' in m for m in refused) == 1, refused
    assert sum('"path": "/v1/ask"' in m for m in refused) == 1, refused
