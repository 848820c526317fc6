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
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


class TooDeep(ValueError):
    """The text nests arrays or objects more than ``MAX_DEPTH`` deep."""


def nesting(text: str) -> int:
    """How deep the text's arrays and objects nest (brackets inside strings not counted)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # no string search for the usual event
        return min(MAX_DEPTH, text.count("[") + text.count("{"))
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads(text: str) -> Any:
    """``json.loads``, after refusing text nested deeper than ``MAX_DEPTH`` (:class:`TooDeep`)."""
    if nesting(text) > MAX_DEPTH:
        raise TooDeep(f"message is nested more than {MAX_DEPTH} deep")
    return json.loads(text)
