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

# One sentence: ends with . ! or ?, and has them inside only when a lowercase letter or a
# digit follows ("john.doe@email.com", "$9.99", not "Thanks.We" nor "time.\u200dI"), which
# is how split_sentences counts too. Invisible format characters (zero-width space/joiner,
# soft hyphen, BOM) are not allowed at all: the model used them to glue sentences; nor are
# control characters (C0, DEL, C1), after the model glued "puería.â\x80¦I" with the mojibake
# of an ellipsis. At most 240 characters, so a looping model reaches the end of its reply
# instead of max_tokens.
_INVISIBLE = "\u00ad\u200b\u200c\u200d\u200e\u200f\u2060\ufeff" r"\x00-\x1f\x7f-\x9f"
_CONTINUES = "a-z0-9ß-öø-ÿ"  # what may follow . ! ? inside a sentence
_UNIT = rf"(?:[^.!?\n\"\\{_INVISIBLE}]|[.!?][{_CONTINUES}])"
_SENTENCE = rf"{_UNIT}{{8,240}}[.!?]"
KEY_ISSUE_PATTERN = rf"^{_SENTENCE}$"
REPLY_PATTERN = rf"^{_SENTENCE}( {_SENTENCE}){{2,4}}$"
REPLY_SENTENCES = (3, 5)
# A sentence ends at . ! ? unless a lowercase letter, a digit or more of . ! ? follows:
# "Thanks.We will help." is two sentences, so a repeat glued on without a space is still a
# repeat.
_SENTENCE_END = re.compile(rf"(?<=[.!?])(?:\s+|(?![{_CONTINUES}.!?]))")
_INVISIBLE_CHARS = re.compile(f"[{_INVISIBLE}]")

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
# After a reply in the wrong language, the retry makes *every* sentence start with one of
# these (as a retry that broke an urgency rule is offered only the allowed urgencies).
SENTENCE_OPENERS = {
    "Spanish": "Lamentamos|Gracias|Hemos|Le|Su|Sus|Por favor|Estamos|Vamos a|Puede|Nuestro|"
    "Nuestra|Entendemos|Sentimos|Revisaremos|Si",
    "French": "Nous|Merci|Votre|Vos|Vous|Je|Si|Pour|Notre|Veuillez|Nos",
    "German": "Wir|Vielen Dank|Ihre|Ihr|Ihren|Sie|Bitte|Es|Danke|Unser|Unsere|Falls|Gerne",
}


def reply_pattern(language: str | None = None, every_sentence: bool = False) -> str:
    """REPLY_PATTERN, its first sentence (or, with `every_sentence`, each sentence) opening
    in `language` when it has openers listed."""
    openers = REPLY_OPENERS.get(language or "")
    if not openers:
        return REPLY_PATTERN
    first = rf"(?:{'|'.join(openers)})[ ,]{_UNIT}{{4,220}}[.!?]"
    if not every_sentence:
        return rf"^{first}( {_SENTENCE}){{2,4}}$"
    rest = rf"(?:{SENTENCE_OPENERS[language]})[ ,]{_UNIT}{{4,220}}[.!?]"
    return rf"^{first}( {rest}){{2,4}}$"


def split_sentences(text: str) -> list[str]:
    """Sentences as the schema's patterns count them: split after . ! ? unless a lowercase
    letter, a digit or more punctuation follows; invisible format characters dropped."""
    return [s for s in _SENTENCE_END.split(_INVISIBLE_CHARS.sub("", text).strip()) if s]


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
    reply_every_sentence: bool = False,
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
            "suggested_response": {
                "type": "string",
                "pattern": reply_pattern(reply_language, reply_every_sentence),
            },
        },
        "required": ["category", "urgency", "entities", "key_issue", "suggested_response"],
        "additionalProperties": False,
    }
