"""Document Q&A over HTTP on `lmstack serve`: the library, uploads, search, cited answers.

    GET    /v1/docs            {"store", "documents": [...], "chunks", "tokens"}
    POST   /v1/docs            multipart/form-data, one or more `files` (and `pdf_password`
                               for PDFs that need one) -> the ingest report, its
                               per-file `warnings` included
    DELETE /v1/docs/{doc_id}   {"deleted", "chunks"}
                               (both with `X-Requested-With: lmstack`: see server/admission.py)
    POST   /v1/docs/search     {query, top_k, mode} -> [Hit.as_json(), ...]
    POST   /v1/ask             {question, strategy, top_k, mode, doc_id, max_tokens, stream}
                               -> Answer.as_json(), or SSE: {"delta"} events, then the
                               answer object, then [DONE]

The store and the embedder load on first use, once per app (opening them costs seconds that
a server that never sees a document should not pay). Ingestion and removal hold one lock,
so two uploads never interleave their writes. The docqa code blocks, so it runs in worker
threads; it generates through the server's own engine (`EngineGenerator`), so answers share
the continuous batch with chat traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import threading
import unicodedata
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from lmstack.errors import InputError
from lmstack.httpapi import DONE, SSEResponse, error_event

STATIC_DIR = Path(__file__).parent / "static"  # the page's Documents tab: mounted by serve
PAGE_SCRIPT = "docs.js"
DEFAULT_STORE = "./lmstack-docs.db"
MAX_UPLOAD_FILES = 100
MAX_FILE_NAME_BYTES = 255  # in UTF-8: a file name's limit on ext4, XFS and most others
MAX_ANSWER_TOKENS = 500  # the Answerer's default answer reserve


def default_store() -> str:
    return os.environ.get("LMSTACK_DOCS_STORE", DEFAULT_STORE)


class SearchRequest(BaseModel):
    query: str
    top_k: int = 5
    mode: str = "hybrid"


class AskRequest(BaseModel):
    question: str
    strategy: str = "rag"
    top_k: int = 5
    mode: str = "hybrid"
    doc_id: str | None = None
    max_tokens: int = 256
    stream: bool = False


class _ClientGone(Exception):
    """The reader of a streamed answer disconnected: stop before the next model call."""


class DocsService:
    """One per app: the store, embedder and generator, each loaded on first use."""

    def __init__(self, async_engine, store: str):
        self.async_engine = async_engine
        self.store_path = store
        self._store = None
        self._generator = None
        self._load_lock = threading.Lock()
        self.write_lock = threading.Lock()

    # ------------------------------------------------------------------ lazy parts

    @property
    def store(self):
        with self._load_lock:
            if self._store is None:
                from lmstack.docqa.store import DocStore

                self._store = DocStore(self.store_path)
            return self._store

    @property
    def generator(self):
        with self._load_lock:
            if self._generator is None:
                from lmstack.llm import EngineGenerator

                self._generator = EngineGenerator(self.async_engine)
            return self._generator

    def retriever(self):
        from lmstack.docqa.retrieve import Retriever
        from lmstack.embed import Embedder

        return Retriever(self.store, Embedder.shared())

    # ------------------------------------------------------------------ library

    def library(self) -> dict:
        records = self.store.documents()
        fields = ("doc_id", "title", "source", "chunks", "tokens", "added_at")
        return {
            "store": self.store.uri,
            "documents": [{k: getattr(r, k) for k in fields} for r in records],
            "chunks": sum(r.chunks for r in records),
            "tokens": sum(r.tokens for r in records),
        }

    def ingest(self, files: list[tuple[str, BinaryIO]], pdf_password: str | None = None) -> dict:
        """Save the uploads under their own names in a temporary folder and ingest them.

        `files` are (name as sent, the spooled upload): copied in blocks, never read whole.
        `pdf_password` goes to the PDF reader only.
        """
        from lmstack.docqa.ingest import Ingestor
        from lmstack.embed import Embedder

        names: list[str] = []
        for given, _ in files:
            name = upload_name(given)
            if name in names:
                raise InputError(f"file name {name!r} appears twice in one upload")
            names.append(name)
        folder = Path(tempfile.mkdtemp(prefix="lmstack-upload-"))
        try:
            paths = []
            for name, (_, data) in zip(names, files):
                data.seek(0)
                with open(folder / name, "wb") as out:
                    shutil.copyfileobj(data, out, 1 << 20)
                paths.append(folder / name)
            with self.write_lock:
                ingestor = Ingestor(self.store, Embedder.shared(), self.generator.tokenizer)
                report = ingestor.ingest(paths, pdf_password=pdf_password)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        # The temporary folder means nothing to the uploader: name the files as sent.
        result = json.loads(json.dumps(report.as_json()).replace(f"{folder}/", ""))
        result["files"] = names
        if report.failed and not (report.added or report.replaced or report.unchanged):
            reasons = "; ".join(f["error"] for f in result["failed"])
            raise InputError(f"no file could be ingested: {reasons}")
        return result

    def remove(self, doc_id: str) -> dict:
        from lmstack.httpapi import APIError

        with self.write_lock:
            if self.store.get(doc_id) is None:
                raise APIError(404, f"no document {doc_id!r} in the store", param="doc_id")
            record = self.store.remove(doc_id)
        return {"deleted": record.doc_id, "chunks": record.chunks}

    # ------------------------------------------------------------------ questions

    def check(self, top_k: int, mode: str, text: str, what: str) -> None:
        """400s that name the value and the limit, before any work (or any stream) starts."""
        from lmstack.docqa.retrieve import MAX_TOP_K, MODES

        if not 1 <= top_k <= MAX_TOP_K:
            raise InputError(f"top_k must be from 1 to {MAX_TOP_K}, got {top_k}")
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not text.strip():
            raise InputError(f"{what} is empty")
        if not self.store.live_versions():
            raise InputError(
                f"the document store {self.store.uri} holds no documents: upload some first "
                "(POST /v1/docs, or the Documents tab of the web page)"
            )

    def search(self, request: SearchRequest) -> list[dict]:
        self.check(request.top_k, request.mode, request.query, "query")
        hits = self.retriever().search(request.query, request.top_k, request.mode)
        return [h.as_json() for h in hits]

    def check_ask(self, request: AskRequest) -> None:
        from lmstack.docqa.answer import STRATEGIES

        if request.strategy not in STRATEGIES:
            raise InputError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {request.strategy!r}"
            )
        if not 1 <= request.max_tokens <= MAX_ANSWER_TOKENS:
            raise InputError(
                f"max_tokens must be from 1 to {MAX_ANSWER_TOKENS}, got {request.max_tokens}"
            )
        self.check(request.top_k, request.mode, request.question, "question")
        if request.doc_id is not None and self.store.get(request.doc_id) is None:
            raise InputError(f"doc_id {request.doc_id!r} is not in the store")

    def ask(self, request: AskRequest, on_text=None):
        from lmstack.docqa.answer import Answerer

        answerer = Answerer(
            self.retriever(),
            self.generator,
            top_k=request.top_k,
            mode=request.mode,
            max_tokens=request.max_tokens,
        )
        return answerer.ask(request.question, request.strategy, on_text, request.doc_id)


def upload_name(given: str) -> str:
    """The name an upload is saved and listed under, or a 400 saying what is wrong with it."""
    shown = repr(given) if len(given) <= 80 else repr(given[:60]) + f"... ({len(given)} chars)"
    control = next((c for c in given if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise InputError(f"file name {shown} contains the control character {control!r}")
    if "/" in given or "\\" in given:
        raise InputError(f"file name {shown} contains a path separator: send the bare name")
    if not given.strip() or given.startswith("."):
        raise InputError(f"file name {shown} is empty or hidden: name the file")
    size = len(given.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_NAME_BYTES:
        raise InputError(
            f"file name {shown} is {size} bytes in UTF-8, the limit is {MAX_FILE_NAME_BYTES}"
        )
    return given


def docs_router(async_engine, store: str | None = None) -> APIRouter:
    from lmstack.httpapi import APIError, parse_body

    service = DocsService(async_engine, store or default_store())
    router = APIRouter()

    @router.get("/v1/docs")
    async def library():
        return await run_in_threadpool(service.library)

    @router.post("/v1/docs")
    async def upload(request: Request):
        kind = request.headers.get("content-type", "")
        if not kind.startswith("multipart/form-data"):
            raise APIError(
                400, f"upload files as multipart/form-data ('files' fields), got {kind!r}"
            )
        # Starlette spools each file to disk past 1 MB, so the body is never held in memory;
        # admission counts its bytes (--max-upload-bytes) and its time (--body-timeout).
        form = await request.form(max_files=MAX_UPLOAD_FILES)
        try:
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise APIError(400, "the upload holds no files: send them as 'files' fields")
            files = [(u.filename or "", u.file) for u in uploads]
            password = form.get("pdf_password")
            password = password if isinstance(password, str) and password else None
            # Parsing, chunking, embedding and the store's writes: all in a worker thread.
            return await run_in_threadpool(service.ingest, files, password)
        finally:
            await form.close()

    @router.delete("/v1/docs/{doc_id:path}")
    async def remove(doc_id: str):
        return await run_in_threadpool(service.remove, doc_id)

    @router.post("/v1/docs/search")
    async def search(request: Request):
        body = await parse_body(request, SearchRequest)
        return await run_in_threadpool(service.search, body)

    @router.post("/v1/ask")
    async def ask(request: Request):
        body = await parse_body(request, AskRequest)
        await run_in_threadpool(service.check_ask, body)
        if not body.stream:
            answer = await run_in_threadpool(service.ask, body)
            return answer.as_json()
        gone = threading.Event()
        return SSEResponse(_answer_events(service, body, gone), gone.set)

    return router


async def _answer_events(service: DocsService, body: AskRequest, gone: threading.Event):
    """The answer's text as it is generated, then the checked answer with its citations."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_text(delta: str) -> None:
        if gone.is_set():
            raise _ClientGone
        loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))

    def work() -> None:
        try:
            result = ("answer", service.ask(body, on_text).as_json())
        except _ClientGone:
            return
        except Exception as exc:  # headers are sent: the error can only travel as an event
            result = ("error", f"{type(exc).__name__}: {exc}")
        loop.call_soon_threadsafe(queue.put_nowait, result)

    worker = threading.Thread(target=work, name="lmstack-ask", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "delta":
                yield f"data: {json.dumps({'delta': value})}\n\n"
                continue
            yield f"data: {json.dumps(value)}\n\n" if kind == "answer" else error_event(value)
            break
        yield DONE
    finally:
        gone.set()
