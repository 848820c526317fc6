"""Which of the user's words, heard while the agent speaks, ask it to stop: what is left of a
transcript once the backchannels ("uh-huh", "mm-hm", "okay", "right", "yeah", ...) are taken
out, from a decode Whisper was sure of. The turn controller applies it (``barge_in`` in the
config)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from realtime.config import BargeInConfig

_NOT_WORD = re.compile(r"[^a-z0-9']+")
# hums and fillers however many letters Whisper writes ("mmmmm", "hmmm", "uhhh", "mhm"), and
# the pieces it splits a hum into ("Mm-h-n."): any word of only the nasal-hum letters m, h, n
_HUM = re.compile(r"^([mhn]+|u+h+|u+m+|a+h+|o+h+|e+r+m*|h+u+h+)$")


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


class BargeInPolicy:
    """Does a transcript of the user's speech over the answer ask it to stop?

    Yes when it has ``min_words`` words that are not backchannels, and

    - Whisper was sure of them: the decode's mean token log probability is at least
      ``min_avg_logprob`` (Whisper's own threshold for a failed decode is -1.0). A hum or a
      cough decodes to made-up words ("And I'm at camp...") at a low probability;
    - the sound could hold them: at most ``max_words_per_s`` words a second of speech (Whisper
      hears whole sentences in a cough). Not checked where the length is not known yet (a
      partial transcript of speech still going on).
    """

    def __init__(self, cfg: BargeInConfig) -> None:
        self.cfg = cfg
        self.backchannels = BackchannelFilter(cfg.backchannels)

    def stops(self, text: str, avg_logprob: float | None, speech_s: float | None) -> bool:
        words = self.backchannels.real_words(text)
        if len(words) < max(1, self.cfg.min_words):
            return False
        if avg_logprob is not None and avg_logprob < self.cfg.min_avg_logprob:
            return False
        if speech_s is not None:
            return BackchannelFilter.count(text) <= self.cfg.max_words_per_s * max(0.1, speech_s)
        return True
