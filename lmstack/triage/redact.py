"""PII redaction: e-mail addresses, phone numbers, card numbers and customer IDs in a text
replaced by typed placeholders.

    redact("Mail ana@example.com or call +44 20 7946 0958")
    # 'Mail [EMAIL] or call [PHONE]'

What counts as each kind:

- [EMAIL]: the addresses grounding.email_spans finds (the triage's own e-mail entity), and
  also "local@domain" without a top-level domain: the bundled model, copying a ticket, cut
  "jane.roe@example.com" to "jane.roe@email.", which still names the person.
- [CARD]: 13-19 digits, one block or groups of 3-6 separated by single spaces or dashes
  ("4111 1111 1111 1111", Amex "3782 822463 10005"), that pass the Luhn check; an order
  number of the same length fails it nine times in ten.
- [CUSTOMER_ID]: an ID token (grounding.ID_TOKEN: a digit, 4+ characters) typed as a
  customer's by the triage's own rules: a prefix (grounding.CUSTOMER_PREFIX: CUS-, C-, ACC-)
  or the words before it (grounding.CUSTOMER_CONTEXT: "customer ID", "Kundennummer"), unless
  the order rules claim it first; plus any token the caller names (`customer_ids`: the
  ticket's typed customer IDs, so a reply that repeats one bare is still redacted).
- [PHONE]: digit groups separated by single spaces, dots or dashes, optionally "+CC" first
  and one parenthesised group ("+1 (555) 123-4567", "+49 (0)30 1234567"), 7-15 digits in
  all, and a shape phones have: "+" first; a parenthesised area code; US 3-3-4; a national
  trunk "0" first (EU: "020 7946 0958", "06 12 34 56 78"); three or more groups of 2-4
  digits. Any other shape, a bare block included, is a phone only after a word such as
  "phone", "call" or "tel" (so "order 66120387" and "ORD-2024-8891" stay). Never a phone:
  dates ("2024-01-15", "15.01.2024"), thousands groupings ("1.234.567"), IP addresses, a
  number after a letter or one of -_/#. ("v2.10.45678", "ORD-2024-8891"), after a currency
  sign, before a letter, "%" or ":" (a time), or after the order words of grounding.

Overlaps go to the kind listed first above. Every pattern is matched without nested
quantifiers and each digit run is inspected once, so the cost is linear in the text (a
megabyte of digits takes about 20 ms, of at-signs about 0.25 s); output is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lmstack.triage.grounding import (
    CUSTOMER_CONTEXT,
    CUSTOMER_PREFIX,
    ID_TOKEN,
    ORDER_CONTEXT,
    ORDER_PREFIX,
    at_sign_spans,
)

EMAIL, CARD, CUSTOMER_ID, PHONE = "[EMAIL]", "[CARD]", "[CUSTOMER_ID]", "[PHONE]"
PRIORITY = (EMAIL, CARD, CUSTOMER_ID, PHONE)  # who keeps an overlap

CARD_DIGITS = (13, 19)
PHONE_DIGITS = (7, 15)  # E.164 allows at most 15 digits, country code included
CONTEXT_CHARS = 30  # how far back the typing words are looked for (as grounding.typed_ids)

# A maximal run of digit groups: each "[ -]" must be followed by a digit, so there is one way
# to split the run and no backtracking beyond a single character.
_DIGIT_RUN = re.compile(r"\d+(?:[ -]\d+)*")
_DIGITS = re.compile(r"\d+")
# A phone-shaped run: optional +CC, optional "(area)", then groups as above (dots too).
_PHONE_RUN = re.compile(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d+(?:[ .-]\d+)*")
_PHONE_CUE = re.compile(
    r"\b(phone|telephone|tel|mobile|cell|cellphone|call|ring|text|sms|whatsapp|fax|"
    r"tel[eé]fono|m[oó]vil|t[eé]l[eé]phone|portable|telefon|handy|rufnummer)\b",
    re.IGNORECASE,
)
_NOT_BEFORE_PHONE = frozenset("-_/#.@")  # "ORD-2024-8891", "#12345678", "v1.2.3"
_CURRENCY = frozenset("$€£¥₹")
_DOMAIN_LABELS = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")  # one way to match: linear
_DOUBLED = str.maketrans("0123456789", "0246813579")
_LETTER = re.compile(r"[^\W\d_]")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (every card number passes it)."""
    backwards = digits[::-1]
    # Every second digit from the right is doubled, its two digits summed: 7 -> 14 -> 5.
    summed = backwards[0::2] + backwards[1::2].translate(_DOUBLED)
    return (sum(summed.encode("ascii")) - 48 * len(summed)) % 10 == 0


def address_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each "local@domain", top-level domain or not: a superset of
    grounding.email_spans (same local part, not reaching into the previous address)."""

    def labels_end(text: str, at: int) -> int | None:
        domain = _DOMAIN_LABELS.match(text, at + 1)
        return None if domain is None else domain.end()

    return at_sign_spans(text, labels_end)


def card_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each Luhn-valid card-like number in `text`."""
    low, high = CARD_DIGITS
    spans = []
    for run in _DIGIT_RUN.finditer(text):
        if run.end() - run.start() < low:
            continue
        groups = [(m.start(), m.end()) for m in _DIGITS.finditer(text, run.start(), run.end())]
        i = 0
        while i < len(groups):
            found = _card_at(text, groups, i, low, high)
            if found is None:
                i += 1
            else:
                spans.append((groups[i][0], groups[found][1]))
                i = found + 1
    return spans


def _card_at(text: str, groups: list[tuple[int, int]], i: int, low: int, high: int):
    """Index of the last group of the longest card starting at group i, or None."""
    start, end = groups[i]
    size = end - start
    if low <= size <= high:  # one block of digits
        return i if luhn_valid(text[start:end]) else None
    if not 3 <= size <= 6:
        return None
    best, total, digits = None, size, text[start:end]
    for j in range(i + 1, min(i + 6, len(groups))):  # at most 19 / 3 -> 6 groups in all
        g_start, g_end = groups[j]
        size = g_end - g_start
        if not 3 <= size <= 6 or total + size > high:
            break
        total += size
        digits += text[g_start:g_end]
        if total >= low and luhn_valid(digits):
            best = j
    return best


def customer_id_spans(text: str, customer_ids: Iterable[str] = ()) -> list[tuple[int, int]]:
    """(start, end) of each ID token typed as a customer's (see the module docstring)."""
    known = set(customer_ids)
    spans = []
    for m in ID_TOKEN.finditer(text):
        token = m.group(1)
        if token in known:
            spans.append(m.span(1))
            continue
        if len(token) < 4 or not any(c.isdigit() for c in token):
            continue
        before = text[max(0, m.start(1) - CONTEXT_CHARS) : m.start(1)].rstrip("#: ")
        # The typing words are letters: most tokens (numbers among numbers) need no search.
        words = _LETTER.search(before) is not None
        if not (CUSTOMER_PREFIX.match(token) or (words and CUSTOMER_CONTEXT.search(before))):
            continue
        if ORDER_PREFIX.match(token) or (words and ORDER_CONTEXT.search(before)):
            continue  # grounding.typed_ids: an order number first
        spans.append(m.span(1))
    return spans


def phone_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each phone number in `text` (see the module docstring)."""
    spans = []
    for run in _PHONE_RUN.finditer(text):
        if run.end() - run.start() >= PHONE_DIGITS[0] and _is_phone(text, run.start(), run.end()):
            spans.append(run.span())
    return spans


def _is_phone(text: str, start: int, end: int) -> bool:
    before = text[start - 1] if start else " "
    if before.isalnum() or before in _NOT_BEFORE_PHONE or before in _CURRENCY:
        return False
    if start >= 2 and before == " " and text[start - 2] in _CURRENCY:
        return False  # "$ 1234567"
    after = text[end : end + 2]
    if (
        after[:1].isalnum()
        or after[:1] in ("%", "@")
        or (after[:1] == ":" and after[1:2].isdigit())
    ):
        return False
    run = text[start:end]
    plus, paren = run.startswith("+"), "(" in run
    groups = _DIGITS.findall(run)
    digits = sum(map(len, groups))
    if not PHONE_DIGITS[0] <= digits <= PHONE_DIGITS[1]:
        return False
    context = text[max(0, start - CONTEXT_CHARS) : start]
    if ORDER_CONTEXT.search(context.rstrip("#: ")):
        return False  # labelled an order number
    if not (plus or paren) and (
        _is_date(run, groups) or _is_thousands(groups) or _is_ip(run, groups)
    ):
        return False
    if plus:
        return digits >= 8
    if paren:
        return True
    seps = set(_separators(run))
    lengths = [len(g) for g in groups]
    if len(groups) >= 2 and (
        lengths == [3, 3, 4]
        or (lengths == [1, 3, 3, 4] and groups[0] == "1")
        or (groups[0].startswith("0") and digits >= 9)
        or (len(groups) >= 3 and len(seps) == 1 and all(2 <= n <= 4 for n in lengths))
    ):
        return True
    return _PHONE_CUE.search(context) is not None


def _separators(run: str) -> list[str]:
    return [ch for ch in run if ch in " .-"]


def _is_date(run: str, groups: list[str]) -> bool:
    """The first three groups read as a date: y-m-d or d-m-y / m-d-y, one separator."""
    if len(groups) < 3:
        return False
    seps = _separators(run)[:2]
    if seps[0] != seps[1]:
        return False
    a, b, c = groups[:3]
    year_first = len(a) == 4 and a[:2] in ("19", "20") and len(b) <= 2 and len(c) <= 2
    year_last = (
        len(a) <= 2
        and len(b) <= 2
        and ((len(c) == 4 and c[:2] in ("19", "20")) or (len(c) == 2 and seps[0] != " "))
    )
    if year_first:
        return 1 <= int(b) <= 12 and 1 <= int(c) <= 31
    if year_last:
        x, y = int(a), int(b)
        return 1 <= x <= 31 and 1 <= y <= 31 and min(x, y) <= 12
    return False


def _is_thousands(groups: list[str]) -> bool:
    """1.234.567 or 12 500 000: an amount, not a number to dial."""
    return (
        len(groups) >= 2
        and 1 <= len(groups[0]) <= 3
        and not groups[0].startswith("0")
        and all(len(g) == 3 for g in groups[1:])
    )


def _is_ip(run: str, groups: list[str]) -> bool:
    return len(groups) == 4 and set(_separators(run)) == {"."} and all(len(g) <= 3 for g in groups)


def pii_spans(text: str, customer_ids: Iterable[str] = ()) -> list[tuple[int, int, str]]:
    """(start, end, placeholder) of every PII span, sorted and non-overlapping."""
    found = {
        EMAIL: address_spans(text),
        CARD: card_spans(text),
        CUSTOMER_ID: customer_id_spans(text, customer_ids),
        PHONE: phone_spans(text),
    }
    kept: list[tuple[int, int, str]] = []
    for tag in PRIORITY:
        kept = _merge(kept, [(s, e, tag) for s, e in found[tag]])
    return kept


def _merge(kept: list[tuple[int, int, str]], new: list[tuple[int, int, str]]):
    """`kept` plus the spans of `new` that overlap none of it; both sorted, in one sweep."""
    out, k = [], 0
    for span in new:
        while k < len(kept) and kept[k][1] <= span[0]:
            out.append(kept[k])
            k += 1
        if k == len(kept) or kept[k][0] >= span[1]:
            out.append(span)
    out.extend(kept[k:])
    return out


def redact(text: str, customer_ids: Iterable[str] = ()) -> str:
    """`text` with every PII span replaced by its placeholder."""
    return _replace(text, pii_spans(text, customer_ids))


def redact_cards(text: str) -> str:
    """`text` with card numbers (only) replaced by [CARD]: the reply guardrail."""
    return _replace(text, [(s, e, CARD) for s, e in card_spans(text)])


def _replace(text: str, spans: list[tuple[int, int, str]]) -> str:
    if not spans:
        return text
    parts, pos = [], 0
    for start, end, tag in spans:
        parts.append(text[pos:start])
        parts.append(tag)
        pos = end
    parts.append(text[pos:])
    return "".join(parts)
