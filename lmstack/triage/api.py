"""`POST /v1/triage`: its router and service, on the server's engine, with the same Triager.

Request: {"subject": "...", "body": "...", "id": "..."} for one ticket, or
{"tickets": [{...}, ...]} for several (answered together, in order), plus optional
"max_retries" and "redact" (true: PII placeholders in the key issue, reply, errors and
warnings, as `lmstack triage --redact`; the entities keep the values). Response: one
record, or {"records": [...]}; records are the CLI's JSONL objects. The triage code is
synchronous, so the route runs it in a worker thread; the generator wraps the server's
AsyncLLMEngine, so triage requests share the continuous batch with chat traffic. The
shipped category classifier narrows the category as it does on the CLI.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lmstack.errors import InputError
from lmstack.httpapi import parse_body
from lmstack.triage.schema import Ticket

STATIC_DIR = Path(__file__).parent / "static"  # the page's Triage tab: mounted by serve
PAGE_SCRIPT = "triage.js"
MAX_TICKETS_PER_REQUEST = 64


class TicketIn(BaseModel):
    subject: str = ""
    body: str = ""
    id: str | None = None


class TriageRequest(BaseModel):
    subject: str | None = None
    body: str | None = None
    id: str | None = None
    tickets: list[TicketIn] | None = None
    max_retries: int = Field(2, ge=0, le=5)
    redact: bool = False


class TriageService:
    """One per server: builds its generator and triagers on first use."""

    def __init__(self, async_engine):
        self.async_engine = async_engine
        self._generator = None
        self._classifier = None
        self._lock = threading.Lock()

    def _triager(self, max_retries: int, redact: bool = False):
        """The CLI's shipped configuration (lmstack.triage.builder) on the server's engine."""
        from lmstack.llm import EngineGenerator
        from lmstack.triage.builder import is_tuned, triage_config
        from lmstack.triage.classifier import shipped_classifier
        from lmstack.triage.triage import Triager

        with self._lock:
            if self._generator is None:
                self._generator = EngineGenerator(self.async_engine)
                self._classifier = shipped_classifier()
        tuned = is_tuned(self.async_engine.model_name)
        config = triage_config(tuned, max_retries=max_retries, classifier=self._classifier)
        config.redact = redact
        return Triager(self._generator, config)

    def handle(self, request: TriageRequest) -> dict:
        if request.tickets is not None:
            if request.subject is not None or request.body is not None:
                raise InputError("give either tickets or subject/body, not both")
            if not 1 <= len(request.tickets) <= MAX_TICKETS_PER_REQUEST:
                raise InputError(
                    f"tickets must hold 1 to {MAX_TICKETS_PER_REQUEST} tickets, "
                    f"got {len(request.tickets)}"
                )
            tickets = [Ticket(**t.model_dump()) for t in request.tickets]
        else:
            tickets = [
                Ticket(subject=request.subject or "", body=request.body or "", id=request.id)
            ]
        for i, ticket in enumerate(tickets):
            if not ticket.text:
                where = f"tickets[{i}]" if request.tickets is not None else "the ticket"
                raise InputError(f"{where} is empty: subject and body are both empty")
        records = self._triager(request.max_retries, request.redact).triage_many(tickets)
        dumped = [r.model_dump() for r in records]
        return {"records": dumped} if request.tickets is not None else dumped[0]


def triage_router(async_engine):
    """POST /v1/triage on the server's engine; the service is built on first use."""
    router = APIRouter()
    service = TriageService(async_engine)

    @router.post("/v1/triage")
    async def triage(request: Request):
        body = await parse_body(request, TriageRequest)
        return await run_in_threadpool(service.handle, body)

    return router
