"""Which of the user's words, heard while the agent speaks, ask it to stop: what is left of a
transcript once the backchannels ("uh-huh", "mm-hm", "okay", "right", "yeah", ...) are taken
out. The policy that uses it is the turn controller's (``barge_in`` in the config)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_NOT_WORD = re.compile(r"[^a-z0-9']+")
# hums and fillers however many letters Whisper writes ("mmmmm", "hmmm", "uhhh", "mhm")
_HUM = re.compile(r"^(m+|h+m+|m+h+m+|u+h+|u+m+|a+h+|o+h+|e+r+m*|h+u+h+)$")


def _words(text: str) -> list[str]:
    return _NOT_WORD.sub(" ", text.lower().replace("-", " ")).split()


class BackchannelFilter:
    def __init__(self, backchannels: Iterable[str]) -> None:
        phrases = {tuple(_words(b)) for b in backchannels}
        phrases.discard(())
        # longest first, so "all right" goes before "right"
        self._phrases = sorted(phrases, key=len, reverse=True)

    def real_words(self, text: str) -> list[str]:
        """The words of ``text`` that are not part of a backchannel phrase."""
        words = _words(text)
        keep: list[str] = []
        i = 0
        while i < len(words):
            for p in self._phrases:
                if tuple(words[i : i + len(p)]) == p:
                    i += len(p)
                    break
            else:
                if not _HUM.match(words[i]):
                    keep.append(words[i])
                i += 1
        return keep

    @staticmethod
    def count(text: str) -> int:
        return len(_words(text))
