"""Which language a ticket is in (English, Spanish, French, German), by function words.

Small and dependency-free: the share of each language's commonest function words among the
text's words. Good enough to ask the model for a reply in the ticket's language and to
check that it gave one; anything unsure counts as English.
"""

from __future__ import annotations

import re

from lmstack.triage.wordvote import vocabularies, vote

_WORDS = {
    "English": "the and is are to of my i you it not have was for with this that your please",
    "Spanish": "el la los las de que y en un una es no mi por para con pero mi pedido hola "
    "gracias necesito tengo está como favor ayuda cuenta",
    "French": "le la les de des et est un une je pas mon ma mes pour avec mais vous bonjour "
    "merci commande compte ai suis ne votre",
    "German": "der die das und ist ich nicht mein meine ein eine zu mit für aber sie hallo "
    "danke bestellung konto habe bitte den dem",
}
_VOCAB = vocabularies(_WORDS)
_TOKEN = re.compile(r"[a-zA-ZÀ-ÿ]+")


def detect_language(text: str) -> str:
    best, scores = vote(text, _TOKEN, _VOCAB)
    if best is None:
        return "English"
    # Ties and near-ties go to English: short tickets share words like "a" and "no".
    if best != "English" and scores[best] < max(2, scores["English"] + 1):
        return "English"
    return best
