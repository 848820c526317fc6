"""Plain-text facts shared by the engine and the TTS (no imports: anything may import it)."""

from __future__ import annotations

SENTENCE_END = ".!?…"  # a character that ends a sentence


def ends_sentence(text: str) -> bool:
    """``text`` ends with a sentence end (trailing whitespace ignored)."""
    tail = text.rstrip()[-1:]
    return bool(tail) and tail in SENTENCE_END
