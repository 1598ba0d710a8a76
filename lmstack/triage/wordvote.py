"""Cue-word voting, shared by the keyword category baseline and language detection."""

from __future__ import annotations

import re


def vocabularies(words_by_label: dict[str, str]) -> dict[str, frozenset[str]]:
    return {label: frozenset(words.split()) for label, words in words_by_label.items()}


def vote(text: str, token: re.Pattern, vocab: dict[str, frozenset[str]]):
    """(best label, {label: hits}) counting the text's lowercased words in each vocabulary;
    ties go to the earlier label. None when the text has no words."""
    words = [w.lower() for w in token.findall(text)]
    if not words:
        return None, {}
    scores = {label: sum(w in cues for w in words) for label, cues in vocab.items()}
    return max(scores, key=lambda label: scores[label]), scores
