"""Triage: generate under the ticket's schema -> validate -> retry with the errors fed back.

    triager = Triager(make_generator())
    record = triager.triage(Ticket(subject="...", body="..."))
    records = triager.triage_many(tickets, on_done=progress)   # one continuous batch

Every attempt is decoded under `output_schema(candidates)`, so it parses, its enums are
valid and its entities are spans of the ticket. A retry repeats the conversation with the
previous answer and the validator's errors; when an error names the allowed urgencies the
retry's schema offers only those, so a rule the model keeps missing cannot survive the
last attempt; likewise a retry after a reply in the wrong language must start every
sentence, not only the first, in the ticket's language (schema.SENTENCE_OPENERS). Tickets
that do not fit the context are cut in the middle, with a warning; so is a ticket that
spells chat markup (control tokens, role tags, <ticket> delimiters: a prompt injection).

With a category classifier (classifier.py), the schema's `category` enum holds only the
classes that cover `category_coverage` of the classifier's probability: its top class alone
at coverage 0 (the shipped default) or when it is sure; several when it is not, and the
language model chooses among them. All tickets of a batch are embedded together, before
any decoding.

Card numbers never reach a record's key issue or reply (validate.guard_output, on every
attempt). With `redact`, a finished record's key issue, reply, errors and warnings (what the
CLI prints to stderr) have e-mails, phones, card numbers and customer IDs replaced by
placeholders (redact.py); the entities keep the values, and the retries still see them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmstack.errors import InputError
from lmstack.llm import ChatRequest, Completion, Generator, chat_markup
from lmstack.triage.grounding import candidates
from lmstack.triage.languages import detect_language
from lmstack.triage.prompt import (
    Example,
    build_messages,
    injection_warning,
    load_examples,
    truncate_middle,
)
from lmstack.triage.redact import redact
from lmstack.triage.schema import CATEGORIES, URGENCIES, Ticket, TriageRecord, output_schema
from lmstack.triage.validate import (
    REPLY_LANGUAGE,
    URGENCY,
    Problem,
    allowed_urgencies,
    codes,
    guard_output,
    parse_output,
    validate,
)

if TYPE_CHECKING:
    from lmstack.triage.classifier import CategoryClassifier

MAX_TICKET_CHARS = 200_000  # beyond this a "ticket" is a file pasted by mistake
MAX_OUTPUT_TOKENS = 640  # the schema's patterns bound the JSON to about 450 tokens


@dataclass
class TriageConfig:
    max_retries: int = 2
    max_tokens: int = MAX_OUTPUT_TOKENS
    examples: list[Example] | None = None  # None: the shipped examples
    use_examples: bool = True
    timeout: float | None = None
    classifier: CategoryClassifier | None = None  # None: the language model decides
    category_coverage: float = 0.0  # see CategoryClassifier.plausible and DEFAULT_COVERAGE
    redact: bool = False  # PII placeholders in the finished record's prose (redact.py)


@dataclass
class _Job:
    """One ticket's state across attempts."""

    index: int
    ticket: Ticket
    text: str  # what the model sees (truncated if needed)
    language: str
    candidates: dict
    record: TriageRecord
    started: float = field(default_factory=time.monotonic)
    feedback: list[str] | None = None
    previous: str | None = None
    urgencies: tuple[str, ...] | None = None
    categories: tuple[str, ...] = CATEGORIES
    reply_every_sentence: bool = False  # after a reply in the wrong language


class Triager:
    def __init__(self, generator: Generator, config: TriageConfig | None = None):
        self.generator = generator
        self.config = config or TriageConfig()
        if self.config.max_retries < 0:
            raise InputError(f"--max-retries must be >= 0, got {self.config.max_retries}")
        if not 0.0 <= self.config.category_coverage <= 1.0:
            raise InputError(
                f"--category-coverage must be in [0, 1], got {self.config.category_coverage}"
            )
        if self.config.examples is None and self.config.use_examples:
            self.config.examples = load_examples()
        self.examples = self.config.examples if self.config.use_examples else []

    # ------------------------------------------------------------------ public

    def triage(self, ticket: Ticket) -> TriageRecord:
        return self.triage_many([ticket])[0]

    def triage_many(
        self,
        tickets: list[Ticket],
        on_done: Callable[[int, TriageRecord], None] | None = None,
    ) -> list[TriageRecord]:
        """All tickets in flight together; each retry round batches the tickets that need it."""
        jobs = [self._job(i, t) for i, t in enumerate(tickets)]
        pending = [job for job in jobs if job.record.errors == []]
        self._narrow_categories(pending)
        for job in jobs:
            if job.record.errors:
                self._finish(job)
                if on_done:
                    on_done(job.index, job.record)
        attempt = 0
        while pending:
            attempt += 1
            last_round = attempt > self.config.max_retries
            requests = [self._request(job) for job in pending]
            retry = []

            def finished(
                k: int,
                completion: Completion,
                pending=pending,
                retry=retry,
                attempt=attempt,
                last_round=last_round,
            ) -> None:
                job = pending[k]
                if self._absorb(job, completion, attempt) or last_round:
                    job.record.latency_s = round(time.monotonic() - job.started, 3)
                    self._finish(job)
                    if on_done:
                        on_done(job.index, job.record)
                else:
                    retry.append(job)

            self.generator.complete_many(requests, on_done=finished)
            pending = sorted(retry, key=lambda job: job.index)
        return [job.record for job in jobs]

    # ------------------------------------------------------------------ steps

    def _job(self, index: int, ticket: Ticket) -> _Job:
        record = TriageRecord(id=ticket.id)
        text = ticket.text
        if not text:
            record.errors = ["the ticket is empty: give a subject or a body"]
        elif len(text) > MAX_TICKET_CHARS:
            record.errors = [
                f"the ticket is {len(text)} characters; the limit is {MAX_TICKET_CHARS}"
            ]
        else:
            warning = injection_warning(text, chat_markup(self.generator, text))
            if warning:
                record.warnings.append(warning)
            text, cut = self._fit(text)
            if cut:
                record.warnings.append(
                    f"ticket truncated: {cut} characters cut from the middle to fit the "
                    f"{self.generator.context_window}-token context window"
                )
        language = detect_language(text) if text else "English"
        return _Job(index, ticket, text, language, candidates(text) if text else {}, record)

    def _narrow_categories(self, jobs: list[_Job]) -> None:
        classifier = self.config.classifier
        if classifier is None or not jobs:
            return
        probs = classifier.predict_proba([job.text for job in jobs])
        for job, row in zip(jobs, probs):
            job.categories = classifier.plausible(row, self.config.category_coverage)

    def _fit(self, text: str) -> tuple[str, int]:
        """Cut the ticket's middle so prompt + answer (+ one retry turn) fit the window."""
        overhead = self.generator.prompt_tokens(build_messages("", self.examples, "English"))
        # A retry adds the previous answer and the errors: keep room for them too.
        retry_room = self.config.max_tokens + 200 if self.config.max_retries else 0
        budget = self.generator.context_window - overhead - self.config.max_tokens - retry_room
        return truncate_middle(text, self.generator.count_tokens, budget)

    def _request(self, job: _Job) -> ChatRequest:
        language = job.language if job.language != "English" else None
        messages = build_messages(job.text, self.examples, language, job.feedback, job.previous)
        schema = output_schema(
            job.candidates,
            categories=job.categories,
            urgencies=job.urgencies or URGENCIES,
            reply_language=language,
            reply_every_sentence=job.reply_every_sentence,
        )
        return ChatRequest(
            messages=messages,
            max_tokens=self.config.max_tokens,
            temperature=0.0,
            json_schema=schema,
            timeout=self.config.timeout,
        )

    def _absorb(self, job: _Job, completion: Completion, attempt: int) -> bool:
        """Fold one attempt into the record; True when the record is final (valid)."""
        record = job.record
        record.attempts = attempt
        if completion.error:
            record.valid, record.errors = False, [f"generation failed: {completion.error}"]
            return True  # an engine error (e.g. timeout) is not the model's to fix
        output, errors = parse_output(completion.text)
        if output is None and completion.finish_reason == "length":
            errors = [f"the answer was cut at {self.config.max_tokens} tokens; be shorter"]
        if output is not None:
            output, guarded = guard_output(output)
            record.warnings += [w for w in guarded if w not in record.warnings]
            errors = validate(output, job.text, job.language)
            record_fields = output.model_dump()
            for name, value in record_fields.items():
                setattr(record, name, getattr(output, name) if name == "entities" else value)
        record.valid, record.errors = not errors, errors
        if errors:
            job.feedback, job.previous = errors, completion.text or None
            broken = codes(errors)
            if URGENCY in broken:
                job.urgencies = allowed_urgencies(job.text)
            if REPLY_LANGUAGE in broken:
                job.reply_every_sentence = True
        return not errors

    def _finish(self, job: _Job) -> None:
        """With `redact`, PII placeholders in the record's prose, errors and warnings; the
        ticket's typed customer IDs and the chosen one count as customer IDs wherever they
        appear (a reply may repeat one without its "customer ID" label)."""
        if not self.config.redact:
            return
        record = job.record
        known = [record.entities.customer_id] if record.entities.customer_id else []
        if "customer_id" in job.candidates.get("required", []):
            known += job.candidates["customer_id"]  # typed as the customer's by grounding
        record.key_issue = redact(record.key_issue, known)
        record.suggested_response = redact(record.suggested_response, known)
        record.warnings = [redact(w, known) for w in record.warnings]
        record.errors = [
            Problem(e.code, redact(e, known)) if isinstance(e, Problem) else redact(e, known)
            for e in record.errors
        ]
