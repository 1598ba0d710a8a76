"""The rating page (`/rate`) and the QC report (`/rate/qc`) as a FastAPI router.

`lmstack serve --ratings-db PATH` mounts it. The page is static HTML/JS (no CDN) that talks
to a small JSON API; every API call carries the rater's token as `Authorization: Bearer`,
and the store resolves it to a rater before anything is read or written, so a rater only
ever sees and changes their own ratings. `/rate/qc` needs the admin token from the plan.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lmstack.align.ratings import CRITERIA, AuthError, NotFoundError, RatingStore
from lmstack.errors import InputError

STATIC_DIR = Path(__file__).parent / "static"  # its own page (/rate), served by this router
MAX_NOTE_CHARS = 2000  # `lmstack serve --max-note-chars`


class RatingBody(BaseModel):
    comparison_id: str
    choice: str
    note: str | None = None


def _token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def rate_router(db_path: str | Path, max_note_chars: int = MAX_NOTE_CHARS) -> APIRouter:
    store = RatingStore(db_path)
    router = APIRouter()

    def rater(request: Request, admin: bool = False) -> str:
        try:
            name, kind = store.rater_for_token(_token(request))
        except AuthError as exc:
            raise HTTPException(401, f"{exc}", headers={"WWW-Authenticate": "Bearer"}) from exc
        if admin and kind != "admin":
            raise HTTPException(403, "the QC report needs the admin token")
        if not admin and kind == "admin":
            raise HTTPException(403, "the admin token cannot rate; use a rater token")
        return name

    def progress(name: str) -> dict:
        assigned = store.assigned(name)
        return {"rated": len(store.ratings_of(name)), "assigned": len(assigned)}

    @router.get("/rate", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "rate.html", media_type="text/html")

    @router.get("/rate/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC_DIR / name
        if name not in {"rate.js", "rate.css"} or not path.is_file():
            raise HTTPException(404, f"no such file: {name}")
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return FileResponse(path, media_type=media)

    @router.get("/rate/api/next")
    async def next_comparison(request: Request):
        name = rater(request)
        comparison = store.next_for(name)
        return {
            "rater": name,
            "comparison": None if comparison is None else comparison.for_rater(),
            "criteria": [{"name": n, "weight": w, "question": q} for n, w, q in CRITERIA],
            "progress": progress(name),
        }

    @router.get("/rate/api/mine")
    async def mine(request: Request):
        name = rater(request)
        return {"rater": name, "ratings": store.ratings_of(name)}

    @router.post("/rate/api/ratings")
    async def post_rating(request: Request, body: RatingBody):
        name = rater(request)
        if body.note is not None and len(body.note) > max_note_chars:
            raise HTTPException(
                400,
                f"note is {len(body.note)} characters, the limit is {max_note_chars} "
                "(--max-note-chars)",
            )
        try:
            await run_in_threadpool(store.rate, name, body.comparison_id, body.choice, body.note)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        except InputError as exc:
            raise HTTPException(400, str(exc)) from exc
        return {"ok": True, "progress": progress(name)}

    @router.get("/rate/qc")
    async def qc(request: Request):
        from lmstack.align.qc import qc_report

        rater(request, admin=True)
        return await run_in_threadpool(qc_report, store)

    return router
