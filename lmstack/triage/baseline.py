"""The keyword baseline every evaluation compares against: count cue words per category.

Deliberately simple and transparent: the category whose keywords occur most wins (ties go
to the earlier category in KEYWORDS; no hit at all is Other), urgency is the validator's
rule floor. A model that cannot beat this is not worth its latency.
"""

from __future__ import annotations

import re

from lmstack.triage.validate import allowed_urgencies
from lmstack.triage.wordvote import vocabularies, vote

KEYWORDS = {
    "Billing": "bill billing invoice invoices payment payments pay paid charge charged refund "
    "refunds money fee fees reimbursement price card paypal cobro reembolso factura "
    "remboursement facture rechnung zahlung",
    "Account": "account accounts login log sign password profile register registration "
    "signup sign-up username locked access user cuenta contraseña compte konto",
    "Shipping": "order orders delivery deliver shipping ship shipped address package parcel "
    "track tracking arrive arrived purchase courier pedido envío commande livraison "
    "bestellung lieferung",
    "Technical": "bug bugs error errors crash crashes crashed app website site broken "
    "freeze freezes slow sync api feature install update loading server down",
    "Other": "newsletter feedback review complaint contact agent human customer service "
    "subscribe unsubscribe thanks",
}
_VOCAB = vocabularies(KEYWORDS)
_WORD = re.compile(r"[a-zA-Zñéèçäöüß-]+")


def keyword_category(text: str) -> str:
    best, scores = vote(text, _WORD, _VOCAB)
    return best if best is not None and scores[best] > 0 else "Other"


def keyword_urgency(text: str) -> str:
    allowed = allowed_urgencies(text)
    return "Medium" if "Medium" in allowed else allowed[0]
