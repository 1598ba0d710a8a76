"""Labelled tickets: the Bitext sample mapped to triage labels, our own tickets, the split.

Bitext (lmstack/data/tickets, CDLA-Sharing-1.0) has 11 categories; they map to ours as its
README suggests. It has no Technical class and no urgency: the Technical tickets in
data/tickets.jsonl were written for this project (and carry hand-assigned urgency,
entities and replies), and Bitext urgency is a documented *silver* label
(`silver_urgency`: questions Low, problems Medium, raised by the validator's urgency cues).

The held-out split is fixed by a hash of the ticket text (`split_of`), so it never changes
between runs, machines or dataset orderings; training and the few-shot examples use only
the "train" side.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.config import data_dir
from lmstack.errors import InputError
from lmstack.triage.schema import split_sentences
from lmstack.triage.validate import CRITICAL_CUES, HIGH_CUES

OWN_TICKETS = Path(__file__).parent / "data" / "tickets.jsonl"
HELDOUT_PERCENT = 20
OWN_HELDOUT_PERCENT = 50

BITEXT_CATEGORY = {
    "ORDER": "Shipping",
    "DELIVERY": "Shipping",
    "SHIPPING_ADDRESS": "Shipping",
    "PAYMENT": "Billing",
    "INVOICE": "Billing",
    "REFUND": "Billing",
    "CANCELLATION_FEE": "Billing",
    "ACCOUNT": "Account",
    "CONTACT": "Other",
    "FEEDBACK": "Other",
    "NEWSLETTER": "Other",
}

# Intents that report a problem or ask for a change (Medium); the rest are questions (Low).
PROBLEM_INTENTS = frozenset(
    [
        "cancel_order",
        "change_order",
        "change_shipping_address",
        "payment_issue",
        "registration_problems",
        "recover_password",
        "delete_account",
        "edit_account",
        "switch_account",
        "get_refund",
        "track_refund",
        "track_order",
        "complaint",
    ]
)

KEY_ISSUE = {
    "cancel_order": "The customer wants to cancel an order{order}.",
    "change_order": "The customer wants to change an order{order}.",
    "place_order": "The customer needs help placing an order.",
    "track_order": "The customer wants to know where an order{order} is.",
    "delivery_period": "The customer asks how long delivery takes.",
    "delivery_options": "The customer asks which delivery options are available.",
    "change_shipping_address": "The customer wants to change the shipping address.",
    "set_up_shipping_address": "The customer needs help setting up a shipping address.",
    "check_invoice": "The customer wants to check an invoice.",
    "get_invoice": "The customer asks for a copy of an invoice.",
    "check_payment_methods": "The customer asks which payment methods are accepted.",
    "payment_issue": "The customer reports a problem with a payment.",
    "get_refund": "The customer wants a refund{order}.",
    "track_refund": "The customer asks about the status of a refund{order}.",
    "check_refund_policy": "The customer asks about the refund policy.",
    "check_cancellation_fee": "The customer asks about the cancellation fee.",
    "create_account": "The customer wants to create an account.",
    "delete_account": "The customer wants to close an account.",
    "edit_account": "The customer wants to edit account details.",
    "switch_account": "The customer wants to switch to a different account plan.",
    "recover_password": "The customer cannot log in and needs to recover a password.",
    "registration_problems": "The customer has trouble registering an account.",
    "contact_customer_service": "The customer wants to contact customer service.",
    "contact_human_agent": "The customer wants to speak to a human agent.",
    "complaint": "The customer wants to file a complaint.",
    "review": "The customer wants to leave feedback about the service.",
    "newsletter_subscription": "The customer asks about the newsletter subscription.",
}

CLOSINGS = (
    "Please reply to this message if anything is still unclear.",
    "Thank you for your patience while we look into this.",
    "We are here to help if you need anything else.",
)


@dataclass
class LabelledTicket:
    id: str
    subject: str
    body: str
    category: str
    urgency: str | None = None
    entities: dict = field(default_factory=dict)  # gold spans; absent fields are unknown
    key_issue: str | None = None
    reply: str | None = None
    source: str = "bitext"

    @property
    def text(self) -> str:
        from lmstack.triage.schema import Ticket

        return Ticket(subject=self.subject, body=self.body).text


def split_of(text: str, percent: int = HELDOUT_PERCENT) -> str:
    """'heldout' for a fixed `percent` of texts (by SHA-256), else 'train'."""
    bucket = int(hashlib.sha256(text.strip().lower().encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < percent else "train"


def split_of_ticket(ticket: LabelledTicket) -> str:
    # Our own tickets are few, so half of them are held out to make their scores mean more.
    return split_of(ticket.text, OWN_HELDOUT_PERCENT if ticket.source == "own" else HELDOUT_PERCENT)


def silver_urgency(intent: str, text: str) -> str:
    if CRITICAL_CUES.search(text):
        return "Critical"
    if HIGH_CUES.search(text):
        return "High"
    return "Medium" if intent in PROBLEM_INTENTS else "Low"


def bitext_path() -> Path:
    return data_dir() / "tickets" / "bitext_customer_support_sample.csv"


def load_bitext(path: Path | None = None) -> list[LabelledTicket]:
    path = path or bitext_path()
    if not path.is_file():
        raise InputError(
            f"Bitext data not found at {path} "
            "(LMSTACK_DATA names a folder with tickets/bitext_customer_support_sample.csv)"
        )
    tickets = []
    with path.open(encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            text = row["instruction"].strip()
            order = row["entity_value"] if row["entity_type"] == "order_id" else None
            order = _as_span(order, text) if order else None
            key = KEY_ISSUE[row["intent"]].format(order=f" {order}" if order else "")
            tickets.append(
                LabelledTicket(
                    id=f"bitext-{i}",
                    subject="",
                    body=text,
                    category=BITEXT_CATEGORY[row["category"]],
                    urgency=silver_urgency(row["intent"], text),
                    # Bitext marks order IDs only: the other fields are unknown, not null.
                    entities={"order_number": order},
                    key_issue=key,
                    reply=reply_from_bitext(row["response"], key),
                )
            )
    return tickets


def load_own_tickets() -> list[LabelledTicket]:
    """The hand-written tickets (Technical and others, four languages) shipped here."""
    tickets = []
    for line in OWN_TICKETS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            data = json.loads(line)
            tickets.append(LabelledTicket(source="own", **data))
    return tickets


def load_labelled(split: str | None = None) -> list[LabelledTicket]:
    tickets = load_bitext() + load_own_tickets()
    return [t for t in tickets if split is None or split_of_ticket(t) == split]


def heldout_sample(limit: int | None = None) -> list[LabelledTicket]:
    """The held-out split for evaluation: all our own held-out tickets, then Bitext ones in
    a fixed pseudo-random order (by hash; the CSV itself is sorted by intent), up to `limit`.
    """
    heldout = load_labelled("heldout")
    own = [t for t in heldout if t.source == "own"]
    bitext = sorted(
        (t for t in heldout if t.source != "own"),
        key=lambda t: hashlib.sha256(t.text.encode()).hexdigest(),
    )
    if limit is not None:
        bitext = bitext[: max(0, limit - len(own))]
    return own + bitext


def _as_span(value: str, text: str) -> str | None:
    """Bitext's order ID as the whole token in the text ("00004587345" for 4587345), or None."""
    from lmstack.triage.grounding import id_candidates

    found = id_candidates(text)
    if value in found:
        return value
    matches = [c for c in found if value in c or c in value]
    return matches[0] if len(matches) == 1 else None


def _has_placeholder(text: str) -> bool:
    """Whether `text` holds "{{...}}" with no "}" inside, as `\\{\\{[^}]*\\}\\}` finds it, in
    one pass (the pattern rescans from every "{{": quadratic in "{{{{...")."""
    start = text.find("{{")
    while start >= 0:
        close = text.find("}", start + 2)
        if close < 0:
            return False
        if text.startswith("}}", close):
            return True
        start = text.find("{{", close + 1)
    return False


_CLEAN_SENTENCE = re.compile(r"^[^.!?\n\"\\]{8,200}[.!?]$")


_VERBS = {
    "wants": "want",
    "asks": "are asking",
    "needs": "need",
    "reports": "are reporting",
    "has": "have",
    "cannot": "cannot",
}


def acknowledgement(key_issue: str) -> str:
    """'The customer wants to X.' -> 'I understand that you want to X.'"""
    words = key_issue.removeprefix("The customer ").split(" ", 1)
    verb = _VERBS.get(words[0], words[0])
    rest = (words[1] if len(words) > 1 else "").replace(" needs ", " need ")
    return f"I understand that you {verb} {rest}".strip()


def reply_from_bitext(response: str, key_issue: str) -> str:
    """An acknowledgement, then clean sentences of a Bitext agent response: 3 in all."""
    sentences = [acknowledgement(key_issue)]
    for paragraph in response.split("\n"):
        paragraph = paragraph.strip()
        if not paragraph or paragraph[0].isdigit() or paragraph.startswith(("-", "*", "•")):
            continue
        for sentence in split_sentences(paragraph):
            if _has_placeholder(sentence) or ":" in sentence or sentence.startswith("I understand"):
                continue
            if _CLEAN_SENTENCE.match(sentence) and sentence not in sentences:
                sentences.append(sentence)
        if len(sentences) >= 3:
            break
    sentences = sentences[:3]
    closings = iter(CLOSINGS)
    while len(sentences) < 3:
        sentences.append(next(closings))
    return " ".join(sentences)


# ------------------------------------------------------------------ augmentation

_FIRST = ["anna", "li", "omar", "sara", "tom", "julia", "kenji", "maria", "paul", "nina"]
_DOMAINS = ["example.com", "mail.com", "example.org", "inbox.net"]
_PRODUCTS = [
    "wireless headphones",
    "premium subscription",
    "smart thermostat",
    "running shoes",
    "coffee grinder",
    "Pro plan",
    "gift card",
    "standing desk",
]


def augment(ticket: LabelledTicket, rng: random.Random) -> LabelledTicket:
    """Add an e-mail, customer ID or product sentence sometimes, so the fields get used.

    Bitext never mentions them, and a model tuned on it alone learns that they are always
    null. Values are random, so nothing can be memorised; spans are exact by construction.
    """
    body, entities = ticket.body, dict(ticket.entities)
    entities.setdefault("customer_id", None)
    entities.setdefault("email", None)
    entities.setdefault("product_name", None)
    extras = []
    if rng.random() < 0.25:
        product = rng.choice(_PRODUCTS)
        extras.append(f"It is about the {product}.")
        entities["product_name"] = product
    if rng.random() < 0.3:
        cid = f"{rng.choice(['CUS', 'CUST', 'C'])}-{rng.randint(10000, 999999)}"
        extras.append(f"My customer ID is {cid}.")
        entities["customer_id"] = cid
    if rng.random() < 0.3:
        email = (
            f"{rng.choice(_FIRST)}.{rng.choice(_FIRST)}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}"
        )
        extras.append(f"My email is {email}.")
        entities["email"] = email
    if extras:
        body = (
            body.rstrip()
            + (" " if body.rstrip().endswith((".", "!", "?")) else ". ")
            + " ".join(extras)
        )
    return LabelledTicket(
        id=ticket.id,
        subject=ticket.subject,
        body=body,
        category=ticket.category,
        urgency=ticket.urgency,
        entities=entities,
        key_issue=ticket.key_issue,
        reply=ticket.reply,
        source=ticket.source,
    )
