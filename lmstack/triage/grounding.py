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

# A whole string that is an e-mail address (validate.py). Unambiguous, so `fullmatch` is
# linear; to find addresses in a text use `email_spans` (searching with a pattern rescans
# from every start: quadratic in "a@a-a-a-..." or a long run of letters).
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}")
_LOCAL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")  # labels: no backtracking needed
_LEADING_LETTERS = re.compile(r"[A-Za-z]*")
ID_TOKEN = re.compile(r"#?([A-Za-z0-9][A-Za-z0-9_/-]*[A-Za-z0-9]|[0-9])")
WORD = re.compile(r"[A-Za-z][A-Za-z0-9+&'-]*")
_SENTENCE_BREAK = re.compile(r"[.!?;:,()\n\"]+")
MAX_PRODUCT_CANDIDATES = 400
MAX_ID_CANDIDATES = 60
# Whole-text substring searches a ticket may cost beyond the one-pass checks (each is
# linear): enough for every real ticket, bounded for a hostile 200,000-character one.
_SEARCH_BUDGET = 200

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


def at_sign_spans(text: str, domain_end) -> list[tuple[int, int]]:
    """(start, end) of each "local@domain", in one pass: per "@", the local part is the run
    of local characters before it (not reaching back into the previous address), and
    `domain_end(text, at)` says where the domain after it ends (None: no address there)."""
    spans: list[tuple[int, int]] = []
    pos = 0  # end of the previous address
    at = text.find("@")
    while at >= 0:
        start = at
        while start > pos and text[start - 1] in _LOCAL_CHARS:
            start -= 1
        end = domain_end(text, at) if start < at else None
        if end is not None:
            spans.append((start, end))
            pos = end
        at = text.find("@", max(at + 1, pos))
    return spans


def _tld_end(text: str, at: int) -> int | None:
    """The domain after "@" up to the last label that starts with two letters (those
    letters are the top-level domain), as the classic pattern's greedy match ends."""
    domain = _DOMAIN.match(text, at + 1)
    if domain is None or "." not in domain.group(0):
        return None
    label_starts = [at + 1]
    for label in domain.group(0).split(".")[:-1]:
        label_starts.append(label_starts[-1] + len(label) + 1)
    for label_start in reversed(label_starts[1:]):
        letters_end = _LEADING_LETTERS.match(text, label_start).end()
        if letters_end - label_start >= 2:
            return letters_end
    return None


def email_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each e-mail address, as `finditer` of the classic pattern
    `[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\\.[A-Za-z0-9-]+)*\\.[A-Za-z]{2,}` finds them."""
    return at_sign_spans(text, _tld_end)


def email_candidates(text: str) -> list[str]:
    return _unique(text[start:end] for start, end in email_spans(text))


def id_candidates(text: str, emails: list[tuple[int, int]] | None = None) -> list[str]:
    """Tokens that look like identifiers: a digit somewhere, 4+ characters, not the part of
    an e-mail address before its "@" (`emails`: email_spans(text), when already known)."""
    emails = email_spans(text) if emails is None else emails
    email_start_at = {text.index("@", start): start for start, _ in emails}
    joined = "\n".join(text[start:end] for start, end in emails)
    searches = _SEARCH_BUDGET
    found: dict[str, None] = {}
    for m in ID_TOKEN.finditer(text):
        token = m.group(1)
        if len(token) < 4 or not any(c.isdigit() for c in token):
            continue
        if text.startswith("@", m.end()):
            if email_start_at.get(m.end(), m.end()) <= m.start(1):
                continue  # the local part of this address
            searches -= 1  # before an "@" that starts no address: part of another one?
            if searches >= 0 and token in joined:
                continue
        found[token] = None
        if len(found) == MAX_ID_CANDIDATES:
            break
    return list(found)


def product_candidates(text: str) -> list[str]:
    """Word n-grams (1-4) inside one sentence that do not start or end with a stop word and
    occur verbatim (single spaces between the words) somewhere in the ticket."""
    # Sentences end at any of .!?;:,()\n" between two words (WORD contains none of them).
    sentences: list[tuple[list[str], list[bool]]] = []
    verbatim: set[str] = set()  # n-grams written with single spaces, built in one pass
    words: list[str] = []
    stop: list[bool] = []
    spaced: list[bool] = []  # spaced[k]: a single space between words[k - 1] and words[k]
    previous_end = 0
    for match in WORD.finditer(text):
        gap = text[previous_end : match.start()]
        previous_end = match.end()
        if gap != " " and _SENTENCE_BREAK.search(gap):
            sentences.append((words, stop))
            _add_verbatim(verbatim, words, stop, spaced)
            words, stop, spaced = [], [], []
        word = match.group(0)
        words.append(word)
        stop.append(word.lower() in STOP_WORDS)
        spaced.append(gap == " ")
    sentences.append((words, stop))
    _add_verbatim(verbatim, words, stop, spaced)
    found: dict[str, None] = {}
    searches = _SEARCH_BUDGET
    for words, stop in sentences:
        if all(stop):
            continue
        for n in (2, 3, 1, 4):  # two-word names first: they are the commonest product names
            for i in range(len(words) - n + 1):
                if stop[i] or stop[i + n - 1]:
                    continue
                phrase = " ".join(words[i : i + n])
                if phrase not in verbatim and searches > 0:  # inside longer words, maybe
                    searches -= 1
                    if phrase in text:
                        verbatim.add(phrase)
                if phrase in verbatim:
                    found[phrase] = None
                    if len(found) == MAX_PRODUCT_CANDIDATES:
                        return list(found)
    return list(found)


def _add_verbatim(verbatim: set[str], words: list[str], stop: list[bool], spaced: list[bool]):
    for i in range(len(words)):
        if stop[i]:
            continue
        phrase = words[i]
        verbatim.add(phrase)
        for j in range(i + 1, min(i + 4, len(words))):
            if not spaced[j]:
                break
            phrase += " " + words[j]
            if not stop[j]:
                verbatim.add(phrase)


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


def typed_ids(text: str, emails: list[tuple[int, int]] | None = None) -> dict[str, list[str]]:
    """IDs split into 'order', 'customer' and 'other' by their prefix or the words before."""
    typed: dict[str, list[str]] = {"order": [], "customer": [], "other": []}
    for token in id_candidates(text, emails):
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
    spans = email_spans(text)
    ids = typed_ids(text, spans)
    emails = _unique(text[start:end] for start, end in spans)
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
