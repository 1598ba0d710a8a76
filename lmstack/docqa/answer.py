"""Cited answers over the store, by four strategies.

- `rag`: the top chunks that fit the budget, one call.
- `map-reduce`: each relevant chunk is asked on its own (all calls in one batch), the
  partial answers are combined in a last call.
- `refine`: the chunks in rank order, each call improving the previous draft.
- `sliding`: the whole of the most relevant document (or `doc_id`) in consecutive windows
  that overlap by one chunk, each window asked (in one batch), then combined.

Sources are numbered; an answer cites them as [n]. Citations are checked after
generation: numbers that name no source are removed, and an answer that cites nothing
gets each sentence attributed to the source it overlaps most (by shared content words), so
every citation maps to a real document and page. When retrieval finds nothing on the
question's topic, the answer is "I don't know" without calling the model.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmstack.docqa.assemble import (
    SYSTEM_PROMPT,
    Budget,
    assemble,
    injection_warnings,
    source_label,
)
from lmstack.docqa.records import Hit
from lmstack.docqa.retrieve import Retriever
from lmstack.errors import InputError, LmstackError
from lmstack.llm import ChatRequest

STRATEGIES = ("rag", "map-reduce", "refine", "sliding")
DONT_KNOW = "I don't know: the documents do not cover this question."
_ABSTAIN = re.compile(
    r"\b(i (?:don't|do not|cannot|can't) (?:know|find|answer)|not (?:mentioned|covered|"
    r"stated|provided|found) in the (?:sources|documents|text)|^none\b)",
    re.IGNORECASE,
)
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_WORD = re.compile(r"[a-z0-9][a-z0-9\-]+")
_STOP = frozenset(
    "the a an and or of to in on for with is are be by as at that this it its from was were "  # noqa: SIM905
    "which what when how who can may must should not no yes does do has have had will would "
    "these those their there such than then also any all each other into used use".split()
)
_MAP_TASK = (
    "Using only these sources, answer the question in one or two sentences, citing the "
    "sources like [1]. If they do not help answer it, reply NONE."
)


@dataclass
class Citation:
    n: int
    doc_id: str
    title: str
    page: int | None
    chunk_id: int
    headings: list[str]
    text: str

    def as_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class Answer:
    question: str
    answer: str
    citations: list[Citation]
    strategy: str
    budget: Budget
    abstained: bool
    calls: int = 0
    seconds: float = 0.0
    sources: list[Hit] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a source that spells <|im_start|>

    def as_json(self) -> dict:
        return {
            "question": self.question,
            "answer": self.answer,
            "citations": [c.as_json() for c in self.citations],
            "strategy": self.strategy,
            "budget": self.budget.as_json(),
            "abstained": self.abstained,
            "calls": self.calls,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


def is_abstention(text: str) -> bool:
    return not text.strip() or bool(_ABSTAIN.search(text.strip()))


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 2}


def attach_citations(text: str, sources: list[Hit]) -> tuple[str, list[int]]:
    """Keep valid [n] markers, drop invalid ones; attribute an uncited answer by overlap."""
    valid: list[int] = []

    def keep(match: re.Match) -> str:
        numbers = [int(x) for x in re.split(r"\s*,\s*", match.group(1))]
        good = [n for n in numbers if 1 <= n <= len(sources)]
        for n in good:
            if n not in valid:
                valid.append(n)
        return "[" + ", ".join(map(str, good)) + "]" if good else ""

    cleaned = _CITE.sub(keep, text).strip()
    if valid or not sources:
        return cleaned, valid
    source_words = [_content_words(h.text) for h in sources]
    sentences = re.split(r"(?<=[.!?])\s+", cleaned)
    out = []
    for sentence in sentences:
        words = _content_words(sentence)
        overlaps = [len(words & sw) for sw in source_words]
        best = max(range(len(sources)), key=lambda i: overlaps[i]) if sources else -1
        if words and overlaps[best] >= max(2, len(words) // 3):
            n = best + 1
            sentence = re.sub(r"([.!?]?)$", f" [{n}]\\1", sentence, count=1)
            if n not in valid:
                valid.append(n)
        out.append(sentence)
    return " ".join(out), valid


# Greedy answers from a small model fall into loops ("a model that includes a model that
# includes ..."). OpenAI's frequency penalty lowers a token's logit by this much for each time
# the answer already used it; unlike HF's repetition penalty it leaves the prompt's tokens
# alone, so quoting the sources costs nothing.
FREQUENCY_PENALTY = 0.5


class Answerer:
    def __init__(
        self,
        retriever: Retriever,
        generator,
        window: int | None = None,
        reserve: int = 500,
        top_k: int = 5,
        mode: str = "hybrid",
        max_tokens: int = 256,
        system_prompt: str = SYSTEM_PROMPT,
        temperature: float = 0.0,
        frequency_penalty: float = FREQUENCY_PENALTY,
    ):
        if max_tokens < 1 or max_tokens > reserve:
            raise InputError(
                f"--max-tokens must be from 1 to the answer reserve ({reserve}), got {max_tokens}"
            )
        self.retriever = retriever
        self.generator = generator
        self.window = min(window or generator.context_window, generator.context_window)
        self.reserve = reserve
        self.top_k = top_k
        self.mode = mode
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.temperature = temperature
        self.frequency_penalty = frequency_penalty
        self.calls = 0

    # ------------------------------------------------------------------ model calls

    def _request(self, messages: list[dict], max_tokens: int | None = None) -> ChatRequest:
        return ChatRequest(
            messages=messages,
            max_tokens=max_tokens or self.max_tokens,
            temperature=self.temperature,
            frequency_penalty=self.frequency_penalty,
            seed=0,
        )

    def _generate(self, messages: list[dict], on_text: Callable[[str], None] | None) -> str:
        self.calls += 1
        request = self._request(messages)
        if on_text is None:
            result = self.generator.complete(request)
            if result.error:
                raise LmstackError(f"the model call failed: {result.error}")
            return result.text
        parts = []
        for delta in self.generator.stream(request):
            parts.append(delta)
            on_text(delta)
        return "".join(parts)

    def _batch(self, message_lists: list[list[dict]], max_tokens: int) -> list[str]:
        self.calls += len(message_lists)
        results = self.generator.complete_many(
            [self._request(m, max_tokens) for m in message_lists]
        )
        failed = [r.error for r in results if r.error]
        if failed:
            raise LmstackError(f"{len(failed)} model calls failed, first: {failed[0]}")
        return [r.text for r in results]

    def _assemble(self, question: str, hits: list[Hit], task=None, first: int = 1):
        return assemble(
            question, hits, self.generator, self.window, self.reserve,
            self.system_prompt, task, first,
        )  # fmt: skip

    # ------------------------------------------------------------------ strategies

    def ask(
        self,
        question: str,
        strategy: str = "rag",
        on_text: Callable[[str], None] | None = None,
        doc_id: str | None = None,
    ) -> Answer:
        if strategy not in STRATEGIES:
            raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if not question or not question.strip():
            raise InputError("the question is empty")
        start = time.perf_counter()
        self.calls = 0
        hits = self.retriever.search(question, self.top_k, self.mode)
        if doc_id is None and not self.retriever.relevant(question, hits):
            budget = self._assemble(question, []).budget
            if on_text:
                on_text(DONT_KNOW)
            return Answer(question, DONT_KNOW, [], strategy, budget, True, 0,
                          time.perf_counter() - start,
                          warnings=injection_warnings(self.generator, question, []))  # fmt: skip
        run = {
            "rag": self._rag,
            "map-reduce": self._map_reduce,
            "refine": self._refine,
            "sliding": self._sliding,
        }[strategy]
        text, sources, budget = run(question, hits, on_text, doc_id)
        warnings = injection_warnings(self.generator, question, sources)
        abstained = is_abstention(text)
        if abstained:
            return Answer(question, text.strip() or DONT_KNOW, [], strategy, budget, True,
                          self.calls, time.perf_counter() - start,
                          warnings=warnings)  # fmt: skip
        text, numbers = attach_citations(text, sources)
        citations = [
            Citation(
                n,
                sources[n - 1].doc_id,
                sources[n - 1].title,
                sources[n - 1].page,
                sources[n - 1].chunk_id,
                sources[n - 1].headings,
                sources[n - 1].text,
            )  # fmt: skip
            for n in sorted(numbers)
        ]
        return Answer(question, text, citations, strategy, budget, False, self.calls,
                      time.perf_counter() - start, sources, warnings)  # fmt: skip

    def _rag(self, question, hits, on_text, doc_id):
        if doc_id is not None:
            hits = [h for h in hits if h.doc_id == doc_id] or self.retriever.store.chunks_of(
                doc_id
            )[: self.top_k]
        context = self._assemble(question, hits)
        return self._generate(context.messages, on_text), context.sources, context.budget

    def _map(self, question: str, groups: list[tuple[int, list[Hit]]]):
        """Ask each group of sources on its own; keep the answers that found something."""
        contexts = [self._assemble(question, hits, _MAP_TASK, first) for first, hits in groups]
        contexts = [c for c in contexts if c.sources]  # a chunk too large for any call
        if not contexts:
            return [], self._assemble(question, []).budget
        answers = self._batch([c.messages for c in contexts], max_tokens=96)
        notes = [
            (context, answer.strip())
            for context, answer in zip(contexts, answers)
            if answer.strip() and not is_abstention(answer) and not answer.strip().upper()
            .startswith("NONE")
        ]  # fmt: skip
        largest = max((c.budget for c in contexts), key=lambda b: b.prompt)
        return notes, largest

    def _reduce(self, question, notes, sources, budget, on_text):
        if not notes:
            if on_text:
                on_text(DONT_KNOW)
            return DONT_KNOW, sources, budget
        lines = []
        for context, note in notes:
            first = sources.index(context.sources[0]) + 1
            last = first + len(context.sources) - 1
            span = f"source {first}" if first == last else f"sources {first}-{last}"
            lines.append(f"- ({span}) {note}")
        task = (
            "Combine these notes into one answer to the question, keeping their source "
            "numbers in brackets like [1]. Use nothing else."
        )
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": "Notes:\n" + "\n".join(lines) +
             f"\n\n{task}\nQuestion: {question}"},
        ]  # fmt: skip
        while len(lines) > 1 and self.generator.prompt_tokens(messages) > self.window - (
            self.reserve
        ):
            lines.pop()
            messages[1]["content"] = (
                "Notes:\n" + "\n".join(lines) + f"\n\n{task}\nQuestion: {question}"
            )
        return self._generate(messages, on_text), sources, budget

    def _map_reduce(self, question, hits, on_text, doc_id):
        if doc_id is not None:
            hits = [h for h in hits if h.doc_id == doc_id] or self.retriever.store.chunks_of(
                doc_id
            )[: self.top_k]
        notes, budget = self._map(question, [(n, [h]) for n, h in enumerate(hits, 1)])
        return self._reduce(question, notes, hits, budget, on_text)

    def _refine(self, question, hits, on_text, doc_id):
        if doc_id is not None:
            hits = [h for h in hits if h.doc_id == doc_id] or self.retriever.store.chunks_of(
                doc_id
            )[: self.top_k]
        draft = ""
        largest = None
        for n, hit in enumerate(hits, 1):
            if not draft or is_abstention(draft):
                task = None
            else:
                task = (
                    f"Draft answer:\n{draft}\n\nRewrite the draft answer, adding what the "
                    "new source says about the question and keeping the draft's [n] "
                    "citations. Output only the answer."
                )
            context = self._assemble(question, [hit], task, first=n)
            if not context.sources:
                continue
            last = n == len(hits)
            draft = self._generate(context.messages, on_text if last else None).strip()
            if largest is None or context.budget.prompt > largest.prompt:
                largest = context.budget
        return draft, hits, largest or self._assemble(question, []).budget

    def _sliding(self, question, hits, on_text, doc_id):
        doc_id = doc_id or hits[0].doc_id
        chunks = self.retriever.store.chunks_of(doc_id)
        # Pack consecutive chunks into windows that each fit, overlapping by one chunk.
        base = self._assemble(question, [], _MAP_TASK).budget.total
        room = self.window - base
        groups: list[tuple[int, list[Hit]]] = []
        start = 0
        while start < len(chunks):
            end, used = start, 0
            while end < len(chunks):
                cost = (
                    self.generator.count_tokens(
                        source_label(end + 1, chunks[end]) + "\n" + chunks[end].text
                    )
                    + 2
                )
                if used + cost > room and end > start:
                    break
                used += cost
                end += 1
            groups.append((start + 1, chunks[start:end]))
            if end >= len(chunks):
                break
            start = max(end - 1, start + 1)
        notes, budget = self._map(question, groups)
        return self._reduce(question, notes, chunks, budget, on_text)


def label_of(citation: Citation) -> str:
    where = citation.doc_id + (f", page {citation.page}" if citation.page is not None else "")
    section = " > ".join(citation.headings[-2:])
    return f"[{citation.n}] {where}" + (f" ({section})" if section else "")
