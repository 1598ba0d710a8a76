"""JSON request bodies: their nesting depth, checked before json.loads sees them.

json.loads recurses once per [ or {, so a body of 100,000 [ raises RecursionError (a 500)
after a long walk. A linear scan that skips strings finds the depth first, in C for nearly
all of it: the brackets outside strings are all that the Python loop walks, and only when
there are more of them than the limit.
"""

from __future__ import annotations

import re

from lmstack.errors import InputError
from lmstack.server.limits import RequestLimits, flag

# Possessive, and the closing quote optional: an unterminated string runs to the end in
# one pass instead of being retried from every later quote (quadratic on '"\\"\\"...').
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"?', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEFAULT = RequestLimits()


def json_nesting(text: str) -> int:
    """The deepest nesting of [ and { in JSON `text`, strings skipped."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_json_depth(text: str, max_depth: int) -> None:
    """InputError (a 400) when `text` nests deeper than `max_depth`."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # cannot nest deeper than it has brackets: nearly every body stops here
    depth = json_nesting(text)
    if depth > max_depth:
        raise InputError(
            f"request body nests {depth} levels deep, over the limit of {max_depth} "
            f"({flag('max_json_depth')})"
        )


def request_limits(request) -> RequestLimits:
    """The limits of the server behind `request` (the defaults for an app without one)."""
    state = getattr(request.app.state, "server", None)
    return getattr(state, "limits", None) or _DEFAULT
