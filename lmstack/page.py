"""The web page: `/` is static/index.html, its scripts and styles are under /static.

Plain HTML, CSS and JavaScript with no build step and nothing fetched from elsewhere, so
the page works on a machine with no internet. It talks to the server only through the
public HTTP API (/v1/..., /metrics), like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def add_web_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        # no-cache: revalidate, so an upgraded server never runs a stale page.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
