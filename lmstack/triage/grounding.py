"""Grounding: the spans of a ticket that an entity field may take, and the check after.

Entity values must be verbatim spans of the ticket or null. Rather than check afterwards
and hope, the per-ticket JSON schema offers each entity field `null` or an enum of the
ticket's own candidate spans, so the decoder cannot write a value the ticket does not
contain, through the in-process engine or any OpenAI server that honours json_schema.

Candidates: e-mail addresses by pattern; IDs as tokens with a digit, at least 4 characters,
a leading '#' dropped ("Order #ORD-2024-8891" gives "ORD-2024-8891"); product names as word
1- to 4-grams that neither start nor end with a stop word. IDs are typed by the words just
before them ("order", "purchase", "pedido"... or "customer ID", "Kundennummer"...) or by a
prefix (ORD-, CUS-): an order-typed ID is not offered as a customer ID and vice versa;
untyped IDs are offered to both, and the model decides.

A span the ticket labels explicitly is *required*: when an ID is typed as an order number
("order 66120387", "ORD-2024-8891") the order_number field must be one of the typed IDs,
likewise for customer IDs, and an e-mail address in the ticket must fill the email field.
Anything less explicit (untyped IDs, product names) stays the model's choice, null included.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
ID_TOKEN = re.compile(r"#?([A-Za-z0-9][A-Za-z0-9_/-]*[A-Za-z0-9]|[0-9])")
WORD = re.compile(r"[A-Za-z][A-Za-z0-9+&'-]*")
MAX_PRODUCT_CANDIDATES = 400
MAX_ID_CANDIDATES = 60

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "into",
        "onto",
        "about",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "have",
        "has",
        "had",
        "i",
        "me",
        "my",
        "mine",
        "we",
        "us",
        "our",
        "you",
        "your",
        "he",
        "she",
        "it",
        "its",
        "they",
        "them",
        "their",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "where",
        "why",
        "how",
        "not",
        "no",
        "yes",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "please",
        "hi",
        "hello",
        "dear",
        "thanks",
        "thank",
        "regards",
        "so",
        "very",
        "just",
        "also",
        "still",
        "again",
        "than",
        "then",
        "too",
        "any",
        "some",
        "all",
        "each",
        "my",
        "order",
        "number",
        "customer",
        "id",
        "email",
        "e-mail",
        "account",
        "ticket",
        "subject",
        "asap",
        "urgent",
        "help",
        "need",
        "want",
        "get",
        "got",
        "im",
        "i'm",
        "can't",
        "cannot",
        "don't",
        "doesn't",
        "didn't",
        "won't",
        "isn't",
        "it's",
        "i've",
        "i'd",
        "i'll",
    ]
)


def email_candidates(text: str) -> list[str]:
    return _unique(m.group(0).rstrip(".") for m in EMAIL.finditer(text))


def id_candidates(text: str) -> list[str]:
    """Tokens that look like identifiers: a digit somewhere, 4+ characters, not an e-mail."""
    emails = email_candidates(text)
    found = []
    for m in ID_TOKEN.finditer(text):
        token = m.group(1)
        if len(token) < 4 or not any(c.isdigit() for c in token):
            continue
        if any(token in e for e in emails) and "@" in text[m.start() : m.end() + 1]:
            continue
        found.append(token)
    return _unique(found)[:MAX_ID_CANDIDATES]


def product_candidates(text: str) -> list[str]:
    """Word n-grams (1-4) inside one sentence that do not start or end with a stop word."""
    found = []
    for sentence in re.split(r"[.!?;:,()\n\"]+", text):
        words = WORD.findall(sentence)
        for n in (2, 3, 1, 4):  # two-word names first: they are the commonest product names
            for i in range(len(words) - n + 1):
                gram = words[i : i + n]
                if gram[0].lower() in STOP_WORDS or gram[-1].lower() in STOP_WORDS:
                    continue
                phrase = " ".join(gram)
                if phrase in text:  # verbatim: single spaces between the words
                    found.append(phrase)
    return _unique(found)[:MAX_PRODUCT_CANDIDATES]


ORDER_CONTEXT = re.compile(
    r"(order|purchase|pedido|commande|bestellung|tracking|parcel|package)\W*"
    r"((number|no|num|id|nr|número|numéro|nummer|is|of|#)\W*){0,3}$",
    re.IGNORECASE,
)
CUSTOMER_CONTEXT = re.compile(
    r"(customer|client|cliente|kunden\w*|account|user|member)\W*"
    r"((id|number|no|num|nr|número|numéro|nummer|is)\W*){0,3}$",
    re.IGNORECASE,
)
ORDER_PREFIX = re.compile(r"^(ORD|ORDER|PO|SO)\b", re.IGNORECASE)
CUSTOMER_PREFIX = re.compile(r"^(CUS|CUST|CUSTOMER|CID|C|ACC|USR|U)-", re.IGNORECASE)


def typed_ids(text: str) -> dict[str, list[str]]:
    """IDs split into 'order', 'customer' and 'other' by their prefix or the words before."""
    typed: dict[str, list[str]] = {"order": [], "customer": [], "other": []}
    for token in id_candidates(text):
        start = text.find(token)
        before = text[max(0, start - 30) : start].rstrip("#: ")
        if ORDER_PREFIX.match(token) or ORDER_CONTEXT.search(before):
            typed["order"].append(token)
        elif CUSTOMER_PREFIX.match(token) or CUSTOMER_CONTEXT.search(before):
            typed["customer"].append(token)
        else:
            typed["other"].append(token)
    return typed


def candidates(text: str) -> dict[str, list[str]]:
    """Allowed non-null values per entity field for a ticket."""
    ids = typed_ids(text)
    emails = email_candidates(text)
    required = [
        name
        for name, present in (
            ("order_number", ids["order"]),
            ("customer_id", ids["customer"]),
            ("email", emails),
        )
        if present
    ]
    return {
        # typed IDs only, when there are any, for a required field
        "customer_id": ids["customer"] or ids["other"],
        "order_number": ids["order"] or ids["other"],
        "product_name": product_candidates(text),
        "email": emails,
        "required": required,
    }


def ungrounded(entities: dict, text: str) -> list[str]:
    """Entity fields whose value is not a verbatim span of `text` (hallucinations)."""
    return [
        name
        for name, value in entities.items()
        if value is not None and (not isinstance(value, str) or value not in text)
    ]


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))
