"""Context assembly inside the window: system prompt + sources + question + answer reserve.

Sources are taken in rank order while they fit; one that does not fit is skipped for a
smaller one further down. The final prompt is re-counted with the chat template applied,
exactly as it will be sent, and sources are dropped from the end until it fits, so the
window can never be exceeded whatever the tokenizer does at the joins. Sources are data:
the in-process engine encodes them as plain text (no document can open a system turn), and
`injection_warnings` names the sources that tried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.docqa.records import Hit
from lmstack.errors import ContextLengthError, InputError
from lmstack.llm import chat_markup

SYSTEM_PROMPT = (
    "You answer questions about documents using only the numbered sources given. "
    "Cite the sources you use with their numbers in brackets, like [1] or [2]. "
    'If the sources do not contain the answer, say "I don\'t know" and nothing else.'
)
# Against a remote model whose tokenizer differs from ours, counts are estimates: keep
# this share of the window free.
ESTIMATE_MARGIN = 0.05


@dataclass
class Budget:
    window: int
    system: int  # the system prompt, in tokens
    question: int  # the question and the instructions around it
    chunks: int  # the sources, as formatted in the prompt
    template: int  # chat-template markup
    reserve: int  # kept for the answer
    num_chunks: int
    prompt: int  # the whole prompt as sent, counted once with the template applied
    exact: bool = True

    @property
    def total(self) -> int:
        return self.prompt + self.reserve

    @property
    def unused(self) -> int:
        return self.window - self.total

    def as_json(self) -> dict:
        return {
            "window": self.window,
            "system": self.system,
            "question": self.question,
            "chunks": self.chunks,
            "num_chunks": self.num_chunks,
            "template": self.template,
            "reserve": self.reserve,
            "prompt": self.prompt,
            "total": self.total,
            "unused": self.unused,
            "exact": self.exact,
        }

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("system prompt", self.system),
            (f"sources ({self.num_chunks} chunks)", self.chunks),
            ("question", self.question),
            ("chat template", self.template),
            ("answer reserve", self.reserve),
            ("total", self.total),
            ("unused", self.unused),
            ("window", self.window),
        ]


@dataclass
class Context:
    messages: list[dict]
    sources: list[Hit]  # source n is sources[n - 1]
    budget: Budget
    skipped: list[Hit] = field(default_factory=list)  # retrieved but did not fit


def source_label(n: int, hit: Hit) -> str:
    where = hit.doc_id
    if hit.page is not None:
        where += f", page {hit.page}"
    section = " > ".join(hit.headings[-2:])
    return f"[{n}] {where}" + (f" ({section})" if section else "")


def format_sources(hits: list[Hit], first: int = 1) -> str:
    return "\n\n".join(f"{source_label(n, h)}\n{h.text}" for n, h in enumerate(hits, first))


def user_message(question: str, sources: str, task: str | None = None) -> str:
    task = task or "Answer the question using the sources, citing them like [1]."
    if sources:
        return f"Sources:\n\n{sources}\n\n{task}\nQuestion: {question}"
    return f"{task}\nQuestion: {question}"


def assemble(
    question: str,
    hits: list[Hit],
    generator,
    window: int | None = None,
    reserve: int = 500,
    system_prompt: str = SYSTEM_PROMPT,
    task: str | None = None,
    first: int = 1,
) -> Context:
    """The largest prefix-by-rank of `hits` that fits beside the rest of the prompt."""
    window = min(window or generator.context_window, generator.context_window)
    if reserve < 1:
        raise InputError(f"--reserve must be at least 1 token, got {reserve}")
    exact = bool(getattr(generator, "exact_tokens", True))
    limit = window - reserve
    if not exact:
        limit -= int(window * ESTIMATE_MARGIN)

    def messages_for(chosen: list[Hit]) -> list[dict]:
        return [
            {"role": "system", "content": system_prompt},
            {
                "role": "user",
                "content": user_message(question, format_sources(chosen, first), task),
            },
        ]

    base = generator.prompt_tokens(messages_for([]))
    if base > limit:
        raise ContextLengthError(base, limit, what="the system prompt and question")
    chosen: list[Hit] = []
    skipped: list[Hit] = []
    used = base
    for hit in hits:
        label = source_label(first + len(chosen), hit)
        cost = generator.count_tokens(label + "\n" + hit.text) + 2
        if used + cost <= limit:
            chosen.append(hit)
            used += cost
        else:
            skipped.append(hit)
    while chosen and generator.prompt_tokens(messages_for(chosen)) > limit:
        skipped.insert(0, chosen.pop())  # token joins counted differently: drop the last
    messages = messages_for(chosen)
    prompt = generator.prompt_tokens(messages)
    system = generator.count_tokens(system_prompt)
    chunk_tokens = generator.count_tokens(format_sources(chosen, first)) if chosen else 0
    question_part = generator.count_tokens(user_message(question, "", task))
    budget = Budget(
        window=window,
        system=system,
        question=question_part,
        chunks=chunk_tokens,
        template=max(0, prompt - system - question_part - chunk_tokens),
        reserve=reserve,
        num_chunks=len(chosen),
        prompt=prompt,
        exact=exact,
    )
    return Context(messages, chosen, budget, skipped)


def injection_warnings(generator, question: str, sources: list[Hit], first: int = 1) -> list[str]:
    """One warning per source (and for the question) that spells chat structure: the
    model's control tokens or <|role|> tags (llm.chat_markup). The in-process engine
    encodes them as plain text; the warning records the attempt."""
    warnings = []
    for n, hit in enumerate(sources, first):
        found = chat_markup(generator, hit.text)
        if found:
            warnings.append(
                f"possible prompt injection: source {source_label(n, hit)} contains chat "
                f"markup ({', '.join(found)}); it was given to the model as document text"
            )
    found = chat_markup(generator, question)
    if found:
        warnings.insert(
            0,
            f"possible prompt injection: the question contains chat markup "
            f"({', '.join(found)}); it was given to the model as text",
        )
    return warnings
