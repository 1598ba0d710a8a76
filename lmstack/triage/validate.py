"""The validator: every rule a triage record must keep, as a list of readable errors.

Schema-constrained decoding already guarantees the JSON parses, the enums are valid and the
entities are spans of the ticket; the validator re-checks all of that (a remote server may
ignore json_schema) and adds what a schema cannot say: the urgency rules, e-mail format,
the reply's sentence count and language. Each error is phrased as an instruction the model
can act on when it is fed back in a retry.

One rule is enforced rather than reported: `guard_output` replaces any card number (a
Luhn-valid 13-19-digit sequence, redact.card_spans) in the key issue and the reply with
[CARD], whatever the caller asked for; a draft that would mail a card number back is never
worth a retry, nor worth keeping.
"""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from lmstack.triage.grounding import EMAIL, ungrounded
from lmstack.triage.languages import detect_language
from lmstack.triage.redact import CARD, redact_cards
from lmstack.triage.schema import REPLY_SENTENCES, URGENCIES, TriageOutput, split_sentences


class Problem(str):
    """One broken rule: the message fed back to the model, and a stable `code` that code
    acts on (a retry that must narrow the urgency or write in the ticket's language)."""

    code: str

    def __new__(cls, code: str, message: str) -> Problem:
        problem = super().__new__(cls, message)
        problem.code = code
        return problem


URGENCY, ENTITY, KEY_ISSUE, REPLY_LENGTH, REPLY_REPEATS, REPLY_LANGUAGE = (
    "urgency",
    "entity",
    "key_issue",
    "reply_length",
    "reply_repeats",
    "reply_language",
)


def codes(errors: list[str]) -> set[str]:
    """The codes of the Problems among `errors` (other messages have none)."""
    return {e.code for e in errors if isinstance(e, Problem)}


# Cues for the urgency rules (Critical: service down, security, deadline within 24 h;
# High: explicit urgency words or a deadline within 48 h), English plus es/fr/de.
CRITICAL_CUES = re.compile(
    r"\b(down|outage|offline|for all (our )?(customers|users)|for everyone|"
    r"security|hack(ed|er)?|breach(ed)?|fraud(ulent)?|unauthori[sz]ed|stolen|phishing|"
    r"data loss|lost all (my|our) data|(by|before|due|deadline is|deadline) (today|tonight)|"
    r"within 24 ?h(ours)?|in \d{1,2} hours?|by end of day|caíd[oa]|hackead[oa]|fraude|"
    r"en panne|piraté|ausgefallen|gehackt|betrug)\b",
    re.IGNORECASE,
)
HIGH_CUES = re.compile(
    r"\b(urgent(ly)?|asap|immediately|right away|emergency|as soon as possible|"
    r"(by|before) tomorrow|within 48 ?h(ours)?|deadline|urgente|inmediatamente|"
    r"lo antes posible|urgence|immédiatement|dringend|sofort)\b",
    re.IGNORECASE,
)


def allowed_urgencies(text: str) -> tuple[str, ...]:
    """Urgencies the rules permit for this ticket text."""
    if CRITICAL_CUES.search(text):
        return ("High", "Critical")
    if HIGH_CUES.search(text):  # "deadline tomorrow" may be under 24 h: Critical is fair
        return ("High", "Critical")
    return ("Low", "Medium", "High")


def parse_output(text: str) -> tuple[TriageOutput | None, list[str]]:
    """The model's JSON as a TriageOutput, or the errors that stop it from being one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"the answer is not valid JSON ({exc.msg} at character {exc.pos})"]
    if not isinstance(data, dict):
        return None, ["the answer must be one JSON object"]
    try:
        return TriageOutput.model_validate(data), []
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                errors.append(f"{where} is required")
            else:
                errors.append(f"{where}: {err['msg']}")
        return None, errors


def guard_output(output: TriageOutput) -> tuple[TriageOutput, list[str]]:
    """`output` with card numbers in key_issue and suggested_response replaced by [CARD], and
    one warning per field changed (the entities keep their values: they are ticket spans)."""
    changes, warnings = {}, []
    for name in ("key_issue", "suggested_response"):
        value = getattr(output, name)
        guarded = redact_cards(value)
        if guarded != value:
            changes[name] = guarded
            warnings.append(f"{name}: a card number was replaced with {CARD}")
    return (output.model_copy(update=changes) if changes else output), warnings


def validate(output: TriageOutput, ticket_text: str, language: str | None = None) -> list[str]:
    """Every broken rule of `output` for `ticket_text`; [] when the record can be trusted."""
    errors = []
    allowed = allowed_urgencies(ticket_text)
    if output.urgency not in allowed:
        if CRITICAL_CUES.search(ticket_text):
            why = "the ticket reports an outage, a security issue or a deadline within 24 h"
        elif "Low" not in allowed:
            why = "the ticket uses urgency words or gives a deadline within 48 h"
        else:
            why = "Critical needs a service outage, a security issue or a 24 h deadline"
        message = f"urgency must be {' or '.join(allowed)}, not {output.urgency}: {why}"
        errors.append(Problem(URGENCY, message))
    entities = output.entities.model_dump()
    for name in ungrounded(entities, ticket_text):
        message = f"entities.{name} {entities[name]!r} is not in the ticket: copy it or use null"
        errors.append(Problem(ENTITY, message))
    email = entities.get("email")
    if email is not None and not EMAIL.fullmatch(email):
        errors.append(
            Problem(ENTITY, f"entities.email {email!r} is not an e-mail address: use null")
        )
    if entities.get("customer_id") and entities.get("customer_id") == entities.get("order_number"):
        message = "entities.customer_id and entities.order_number are the same value"
        errors.append(Problem(ENTITY, message))
    key_issue = output.key_issue.strip()
    if not key_issue:
        errors.append(
            Problem(KEY_ISSUE, "key_issue is empty: summarise the problem in one sentence")
        )
    elif len(split_sentences(key_issue)) != 1:
        message = f"key_issue has {len(split_sentences(key_issue))} sentences; write one"
        errors.append(Problem(KEY_ISSUE, message))
    n = len(split_sentences(output.suggested_response))
    low, high = REPLY_SENTENCES
    if not low <= n <= high:
        message = f"suggested_response has {n} sentences; write {low} to {high}"
        errors.append(Problem(REPLY_LENGTH, message))
    sentences = [x.lower() for x in split_sentences(output.suggested_response)]
    if len(set(sentences)) < len(sentences):
        message = "suggested_response repeats a sentence; write each sentence once"
        errors.append(Problem(REPLY_REPEATS, message))
    language = language or detect_language(ticket_text)
    if language != "English" and detect_language(output.suggested_response) != language:
        message = f"suggested_response must be written in {language}, the ticket's language"
        errors.append(Problem(REPLY_LANGUAGE, message))
    return errors


def urgency_rank(urgency: str) -> int:
    return URGENCIES.index(urgency)
