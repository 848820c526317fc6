"""Client JSON is refused by its nesting, counted on the text, not by where Python's parser
runs out of stack (which depends on the caller's own depth)."""

import json
import sys

import pytest

from realtime.server import json_depth


def nested(depth: int, event_id: str = "ev_1") -> str:
    return '{"event_id": "' + event_id + '", "a": ' + "[" * depth + "]" * depth + "}"


def test_nesting_is_counted_outside_strings():
    assert json_depth.nesting('{"a": [1, {"b": 2}]}') == 3
    # brackets inside strings (escaped quotes too) do not count
    text = '{"t": "' + "[{" * 200 + '\\"' + "[" * 50 + '"}'
    assert json_depth.nesting(text) == 1
    assert json_depth.loads(text)["t"].startswith("[{[{")


def test_too_deep_is_refused_at_any_stack_depth():
    limit = json_depth.MAX_DEPTH
    assert json_depth.loads(nested(limit - 1))["event_id"] == "ev_1"
    with pytest.raises(json_depth.TooDeep):
        json_depth.loads(nested(limit))

    def deep_call(n: int, text: str) -> object:  # the same text, parsed deep in a stack
        if n:
            return deep_call(n - 1, text)
        return json_depth.loads(text)

    # a text Python itself parses at the top of the stack ...
    text = nested(sys.getrecursionlimit() // 2)
    assert json.loads(text)["event_id"] == "ev_1"
    # ... is refused the same way wherever it is parsed
    for n in (0, 100, sys.getrecursionlimit() // 3):
        with pytest.raises(json_depth.TooDeep):
            deep_call(n, text)


def test_stray_quotes_are_scanned_in_one_pass():
    """A quote that never closes, then thousands of escaped quotes: a scan that retried from
    every quote took time quadratic in the text (0.7 s for 16 kB, minutes for a megabyte, the
    event loop blocked all the while); one pass reads it as one open string."""
    text = "[" * 100 + '"' + '\\"' * 200_000
    assert json_depth.nesting(text) == 100
    with pytest.raises(json_depth.TooDeep):
        json_depth.loads(text)
