"""The web page: `/` is static/index.html, the shell's scripts and styles are under /static,
and each mounted app's page script under /static/<app>/ from the app's own static folder.

Plain HTML, CSS and JavaScript with no build step and nothing fetched from elsewhere, so
the page works on a machine with no internet. It talks to the server only through the
public HTTP API (/v1/..., /metrics), like any other client.

The shell (tabs, chat, metrics, the attention explainer) always runs. Which apps are mounted
depends on the extras installed, so the composition root passes their page parts here and
index.html gets them as JSON: app.js imports the scripts of the mounted apps and explains
the tabs of the others, without a request of its own (that would need the API key first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
MARKER = "<!-- page-apps -->"  # where index.html gets the apps' JSON and preload links


@dataclass(frozen=True)
class PagePart:
    """One app's part of the page: its tab (the section id in index.html) and its script.

    The script is an ES module exporting `init()`, which returns the tab's on-show callback
    (or nothing); it imports the shell's helpers from /static/common.js.
    """

    app: str  # served from /static/<app>/
    tab: str
    directory: Path
    script: str

    @property
    def url(self) -> str:
        return f"/static/{self.app}/{self.script}"


def render_index(parts: list[PagePart], off: dict[str, str]) -> str:
    """index.html with the mounted parts and, per tab that is off, the reason."""
    config = {"parts": [{"tab": p.tab, "script": p.url} for p in parts], "off": off}
    # "<" escaped: no text in the JSON can close the <script> element.
    data = json.dumps(config).replace("<", "\\u003c")
    lines = [f'<script type="application/json" id="page-apps">{data}</script>']
    lines += [f'<link rel="modulepreload" href="{p.url}">' for p in parts]
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if MARKER not in html:
        raise RuntimeError(f"{STATIC_DIR / 'index.html'} lacks {MARKER}")
    return html.replace(MARKER, "\n".join(lines))


def add_web_page(
    app: FastAPI, parts: list[PagePart] = (), off: dict[str, str] | None = None
) -> None:
    """Serve the page with `parts` mounted; `off` maps a tab to why its app is not."""
    page = render_index(list(parts), dict(off or {}))

    @app.get("/", include_in_schema=False)
    async def index():
        # no-cache: revalidate, so an upgraded server never runs a stale page.
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    # Each app's folder before the shell's: a mount matches by prefix, first one first.
    for part in parts:
        app.mount(
            f"/static/{part.app}",
            StaticFiles(directory=part.directory),
            name=f"static-{part.app}",
        )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
