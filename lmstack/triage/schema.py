"""The triage record: pydantic models, and the JSON schema that constrains generation.

`TriageOutput` is what the model writes; `TriageRecord` is what callers get (the output plus
`id`, `valid`, `errors`, `latency_s`, `warnings`). `output_schema(candidates)` is the schema
for one ticket: entity fields may only be null or one of the ticket's own candidate spans
(see grounding.py), and `key_issue`/`suggested_response` carry sentence-shape patterns, so
decoding cannot produce an invented order number or a ten-paragraph reply.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

CATEGORIES = ("Billing", "Technical", "Account", "Shipping", "Other")
URGENCIES = ("Low", "Medium", "High", "Critical")
ENTITY_FIELDS = ("customer_id", "order_number", "product_name", "email")

Category = Literal["Billing", "Technical", "Account", "Shipping", "Other"]
Urgency = Literal["Low", "Medium", "High", "Critical"]

# One sentence: ends with . ! or ?, and has them inside only when neither a space nor a
# capital follows ("john.doe@email.com", "$9.99", not "Thanks.We"), which is how
# split_sentences counts too. At most 240 characters, so a looping model reaches the end of
# its reply instead of max_tokens.
_CAPITAL = "A-ZÀ-ÖØ-Þ¿¡"  # what may open a sentence, Spanish ¿ and ¡ included
_UNIT = rf"(?:[^.!?\n\"\\]|[.!?][^.!?\s\"\\{_CAPITAL}])"
_SENTENCE = rf"{_UNIT}{{8,240}}[.!?]"
KEY_ISSUE_PATTERN = rf"^{_SENTENCE}$"
REPLY_PATTERN = rf"^{_SENTENCE}( {_SENTENCE}){{2,4}}$"
REPLY_SENTENCES = (3, 5)
# A sentence ends at . ! ? followed by whitespace, or directly by a capital: "Thanks.We will
# help." is two sentences, so a repeat glued on without a space is still a repeat.
_SENTENCE_END = re.compile(rf"(?<=[.!?])(?:\s+|(?=[{_CAPITAL}]))")

# How a reply opens in each non-English language the triage detects. The reply pattern for
# such a ticket must start with one of these: the 135M model, left free, answered 10 of 15
# Spanish, French and German tickets in English; made to open in the ticket's language it
# stayed there in 13 of 15. No greetings ("Hola", "Bonjour"): most tickets open with one,
# and after it the model tends to copy the ticket instead of replying to it.
REPLY_OPENERS = {
    "Spanish": ("Lamentamos", "Gracias por", "Entendemos", "Sentimos"),
    "French": ("Nous sommes désolés", "Merci pour", "Nous avons", "Nous comprenons"),
    "German": ("Es tut uns leid", "Vielen Dank", "Wir haben", "Wir verstehen"),
}


def reply_pattern(language: str | None = None) -> str:
    """REPLY_PATTERN, its first sentence opening in `language` when it has REPLY_OPENERS."""
    openers = REPLY_OPENERS.get(language or "")
    if not openers:
        return REPLY_PATTERN
    first = rf"(?:{'|'.join(openers)})[ ,]{_UNIT}{{4,220}}[.!?]"
    return rf"^{first}( {_SENTENCE}){{2,4}}$"


def split_sentences(text: str) -> list[str]:
    """Sentences as the schema's patterns count them (split after . ! ? and whitespace,
    or before a capital that follows . ! ? directly)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


class Entities(BaseModel):
    customer_id: str | None = None
    order_number: str | None = None
    product_name: str | None = None
    email: str | None = None


class TriageOutput(BaseModel):
    category: Category
    urgency: Urgency
    entities: Entities
    key_issue: str
    suggested_response: str


class Ticket(BaseModel):
    subject: str = ""
    body: str = ""
    id: str | None = None

    @property
    def text(self) -> str:
        """Subject and body as the model and the grounding check see them."""
        if self.subject.strip():
            return f"Subject: {self.subject.strip()}\n{self.body.strip()}".strip()
        return self.body.strip()


class TriageRecord(BaseModel):
    """One ticket's result: the schema fields plus provenance and validation."""

    id: str | None = None
    category: Category | None = None
    urgency: Urgency | None = None
    entities: Entities = Field(default_factory=Entities)
    key_issue: str = ""
    suggested_response: str = ""
    valid: bool = False
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    attempts: int = 0
    latency_s: float = 0.0


def entity_schema(values: list[str], required: bool = False) -> dict:
    """null, or exactly one of `values` (the ticket's own spans); no null when `required`."""
    if not values:
        return {"type": "null"}
    if required:
        return {"type": "string", "enum": list(values)}
    return {"anyOf": [{"type": "null"}, {"type": "string", "enum": list(values)}]}


def output_schema(
    candidates: dict[str, list[str]] | None = None,  # grounding.candidates(text)
    categories: tuple[str, ...] = CATEGORIES,
    urgencies: tuple[str, ...] = URGENCIES,
    reply_language: str | None = None,
) -> dict:
    """The JSON schema for one ticket; without candidates every entity must be null, and a
    `reply_language` with REPLY_OPENERS fixes how the reply opens (see reply_pattern).

    Property order is generation order: category and urgency first, so the label is decided
    before the model starts writing prose.
    """
    candidates = candidates or {}
    required = set(candidates.get("required", []))
    entities = {
        name: entity_schema(candidates.get(name, []), name in required) for name in ENTITY_FIELDS
    }
    return {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": list(categories)},
            "urgency": {"type": "string", "enum": list(urgencies)},
            "entities": {
                "type": "object",
                "properties": entities,
                "required": list(ENTITY_FIELDS),
                "additionalProperties": False,
            },
            "key_issue": {"type": "string", "pattern": KEY_ISSUE_PATTERN},
            "suggested_response": {"type": "string", "pattern": reply_pattern(reply_language)},
        },
        "required": ["category", "urgency", "entities", "key_issue", "suggested_response"],
        "additionalProperties": False,
    }
