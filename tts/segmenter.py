"""Streaming text segmenter: answer text deltas in, speakable pieces out.

The first piece is released as early as it can be spoken naturally: at the first clause or
sentence boundary, or after ``first_piece_words`` words when no punctuation comes. Later
pieces end at sentence ends, at clause boundaries once the piece is long enough, at line
breaks, or at a word boundary before ``max_piece_chars``.

Early pieces are kept short so that audio never runs dry: a piece's synthesis time grows with
its length, and it can only start once its text is complete. So while little has been
released, a piece ends at a clause once it is as long as everything released before it, and
at a word once it is ``growth`` times that long; the allowed size grows geometrically up to
``long_piece_chars`` (clauses) and ``max_piece_chars``.

Two invariants, tested with hypothesis:

* ``"".join(pieces) == "".join(deltas)``: nothing is lost, added or duplicated (whitespace
  between pieces is kept, at the start of the next piece);
* the pieces do not depend on how the text was split into deltas: every cut is decided from
  the text before it plus a lookahead that the segmenter waits for (one character after a
  ``.``, or after a ``,``/``:`` that follows a digit), so streaming equals whole-input.
"""

from __future__ import annotations

from dataclasses import dataclass

from realtime.text import SENTENCE_END

CLAUSE_END = ",;:—–"  # em and en dash
CLOSERS = "\"')]}’”*_»"
# Words a piece should not end on when it is cut between words: the listener hears a pause.
FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for from with and or but nor so as than that this these those "
    "is are was were be been am my your his her its our their i you we they he she it if "
    "into onto about over under not no very".split()
)
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st sr jr vs etc approx dept fig inc ltd corp vol gov sen rev hon capt "
    "sgt lt cmdr ave blvd jan feb apr aug sept oct nov dec e.g i.e a.m p.m u.s u.k cf al".split()
)


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    first_piece_words: int = 3  # cut the first piece after this many words if no punctuation
    second_piece_words: int = 12  # the same for the second piece (audio is still short)
    long_piece_chars: int = 60  # from the third piece on, clause cuts need this many chars
    growth: float = 2.0  # from the third piece on, cut between words past growth x released
    max_piece_chars: int = 220  # no piece is longer (cut at a space, or hard if none)


def _is_speakable(text: str) -> bool:
    return any(c.isalnum() for c in text)


def _word_before(buf: str, end: int) -> str:
    start = end
    while start > 0 and not buf[start - 1].isspace():
        start -= 1
    return buf[start:end]


class Segmenter:
    """Not thread-safe: one per stream, fed from one thread."""

    def __init__(self, cfg: SegmenterConfig | None = None) -> None:
        self.cfg = cfg or SegmenterConfig()
        if self.cfg.max_piece_chars < 2:
            raise ValueError("max_piece_chars must be at least 2")
        self._buf = ""
        self.pieces_out = 0
        self.released_chars = 0

    @property
    def pending(self) -> str:
        """Text received but not yet released."""
        return self._buf

    def candidate(self) -> str | None:
        """The next piece if a space came now (for speculative synthesis), without consuming.

        With "The capital of France" pending, a space would release it as the first piece;
        synthesising it before that space arrives saves a token's time.
        """
        if not self._buf:
            return None
        cut = self._find_cut(self._buf + " ", final=False)
        return self._buf[:cut] if cut is not None and cut <= len(self._buf) else None

    def push(self, delta: str) -> list[str]:
        self._buf += delta
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of input: release everything (the last piece may be unspeakable whitespace)."""
        out = self._drain(final=True)
        if self._buf:
            out.append(self._buf)
            self.released_chars += len(self._buf)
            self._buf = ""
            self.pieces_out += 1
        return out

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            cut = self._find_cut(self._buf, final)
            if cut is None:
                break
            out.append(self._buf[:cut])
            self._buf = self._buf[cut:]
            self.pieces_out += 1
            self.released_chars += cut
        return out

    # -- the cut rules ------------------------------------------------------------------------

    def _find_cut(self, buf: str, final: bool) -> int | None:
        """The first cut position in ``buf`` (a new piece), or None to wait for more text."""
        cfg = self.cfg
        index = self.pieces_out
        limit = cfg.max_piece_chars
        words = 0
        word_start = -1  # index where the current word began, -1 between words
        in_code = False  # inside `...`: never cut softly
        bracket = 0  # inside [...]: never cut softly
        n = len(buf)
        i = 0
        while i < n and i < limit:
            c = buf[i]
            if c == "`":
                in_code = not in_code
            elif c == "[":
                bracket += 1
            elif c == "]" and bracket:
                bracket -= 1
            protected = in_code or bracket > 0
            if c.isspace():
                if word_start >= 0 and _is_speakable(buf[word_start:i]):
                    words += 1
                    if not protected and self._word_cut(buf, i, index, words):
                        return i
                word_start = -1
                if c == "\n" and not protected and _is_speakable(buf[:i]):
                    return i
            elif word_start < 0:
                word_start = i
            if protected:
                i += 1
                continue
            if c in SENTENCE_END:
                decision = self._sentence_cut(buf, i, final)
                if decision is None:
                    return None
                if decision > limit:
                    return self._hard_cut(buf, limit)
                if decision > 0:
                    return decision
            elif c in CLAUSE_END:
                decision = self._clause_cut(buf, i, final, index)
                if decision is None:
                    return None
                if decision > 0:
                    return decision
            i += 1
        if n > limit:
            return self._hard_cut(buf, limit)
        return None

    def _word_cut(self, buf: str, i: int, index: int, words: int) -> bool:
        """A cut between words at ``i`` (the first whitespace after a word)."""
        if index == 0:
            target, extra = self.cfg.first_piece_words, words - self.cfg.first_piece_words
        elif index == 1:
            target, extra = self.cfg.second_piece_words, words - self.cfg.second_piece_words
        else:
            limit = self.cfg.growth * self.released_chars
            if limit >= self.cfg.max_piece_chars or i < limit:
                return False
            target, extra = 0, 0 if i < limit + 20 else 3
        if words < target:
            return False
        word = _word_before(buf, i).strip(CLOSERS + "\"'(").lower()
        if extra < 3 and (word in FUNCTION_WORDS or any(c.isdigit() for c in word)):
            # "the capital of" -> wait for "France"; "$3" or "3:30" -> wait for "million", "pm"
            return False
        return _is_speakable(buf[:i])

    def _sentence_cut(self, buf: str, i: int, final: bool) -> int | None:
        """At a sentence mark at ``i``: the cut position, 0 for no cut, None to wait."""
        end = i + 1
        while end < len(buf) and buf[end] in SENTENCE_END:
            end += 1
        while end < len(buf) and buf[end] in CLOSERS:
            end += 1
        if end >= len(buf):
            if not final:
                return None
        elif not buf[end].isspace():
            return 0  # "3.5", "e.g.", "example.com", "?q=1"
        if not _is_speakable(buf[:i]):
            return 0
        if buf[i] == "." and self._period_is_not_an_end(buf, i, _word_before(buf, i + 1)):
            return 0
        return end

    @staticmethod
    def _period_is_not_an_end(buf: str, i: int, word: str) -> bool:
        core = word.rstrip(".").lstrip(CLOSERS + "\"'(").lower()
        if core in ABBREVIATIONS:
            return True
        if len(core) == 1 and core.isalpha():
            return True  # an initial: "J. K. Rowling"
        if core.isdigit():
            line_start = buf.rfind("\n", 0, i) + 1
            if not buf[line_start : i - len(core)].strip():
                return True  # a numbered list marker: "1. First"
        return False

    def _clause_cut(self, buf: str, i: int, final: bool, index: int) -> int | None:
        """At a clause mark at ``i``: the cut position, 0 for no cut, None to wait."""
        if index >= 2 and i + 1 < min(self.cfg.long_piece_chars, self.released_chars):
            return 0
        c = buf[i]
        if not _is_speakable(buf[:i]):
            return 0
        if c == ":" or (c == "," and i > 0 and buf[i - 1].isdigit()):
            # "1,000", "3:30" and "https://" continue; "in 2024, we" and "Note: it" do not.
            if i + 1 >= len(buf):
                return None if not final else i + 1
            if not buf[i + 1].isspace():
                return 0
        return i + 1

    def _hard_cut(self, buf: str, limit: int) -> int:
        """No natural cut in the first ``limit`` chars: cut at the last space, else at limit."""
        space = max(buf.rfind(" ", 0, limit + 1), buf.rfind("\n", 0, limit + 1))
        if space > 0 and _is_speakable(buf[:space]):
            return space
        return limit
