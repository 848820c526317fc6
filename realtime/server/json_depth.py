"""JSON from clients, parsed only when it nests at most ``MAX_DEPTH`` deep.

Python's parser gives up on deep nesting with a ``RecursionError`` whose depth depends on how
deep the caller's own stack already is, so the same message could be parsed in one place and
refused in another. Refusing it by its nesting, counted on the text before parsing, makes the
answer the same everywhere (and no event of any protocol nests more than a few levels)."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64
# a string (closed, or running to the end of the text: an unclosed quote matches once, never
# again from each later quote, which made the scan quadratic on text full of stray quotes) or a
# bracket; one pass, linear in the text
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)


class TooDeep(ValueError):
    """The text nests arrays or objects more than ``MAX_DEPTH`` deep."""


def nesting(text: str) -> int:
    """How deep the text's arrays and objects nest (brackets inside strings not counted)."""
    depth = deepest = 0
    for m in _TOKEN.finditer(text):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def loads(text: str) -> Any:
    """``json.loads``, after refusing text nested deeper than ``MAX_DEPTH`` (:class:`TooDeep`)."""
    # no scan for the usual event: with this few brackets it cannot nest deeper
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting(text) > MAX_DEPTH:
        raise TooDeep(f"message is nested more than {MAX_DEPTH} deep")
    return json.loads(text)
