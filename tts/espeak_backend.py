"""espeak-ng as a fallback TTS head: the Debian ``espeak-ng`` binary, one process per piece.

Robotic but tiny and always offline. Needs ``apt-get install espeak-ng``.
"""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache
from typing import Literal

import numpy as np

from realtime.audio import resample
from realtime.config import TTSConfig
from tts.base import stream_speaking_rate
from tts.normalize import normalize
from tts.segmenter import SegmenterConfig
from tts.stream import TextStream

DEFAULT_VOICE = "en-us"
WORDS_PER_MINUTE = 175  # espeak-ng's default speed, scaled by speaking_rate


class EspeakUnavailableError(RuntimeError):
    pass


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakUnavailableError(
            "the espeak-ng fallback needs the espeak-ng program (Debian: apt-get install espeak-ng)"
        )
    return path


@lru_cache(maxsize=1)
def espeak_voices() -> tuple[str, ...]:
    out = subprocess.run(
        [espeak_binary(), "--voices"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    names = {line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1}
    return tuple(sorted(names))


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """espeak-ng writes a streaming WAV to stdout (its sizes are placeholders): read it by hand."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("espeak-ng did not write a WAV file")
    rate = int.from_bytes(data[24:28], "little")
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            body = data[pos + 8 :]
            body = body[: len(body) // 2 * 2]
            return np.frombuffer(body, np.int16).astype(np.float32) / 32768.0, rate
        pos += 8 + size
    raise ValueError("no data chunk in espeak-ng output")


def espeak_synthesize(
    text: str, voice: str = DEFAULT_VOICE, speaking_rate: float = 1.0
) -> tuple[np.ndarray, int]:
    """Float32 mono audio and its sample rate (22050 Hz for the stock voices)."""
    wpm = str(max(80, min(500, round(WORDS_PER_MINUTE * speaking_rate))))
    result = subprocess.run(
        [espeak_binary(), "--stdout", "-v", voice, "-s", wpm],
        input=text.encode("utf-8"),
        capture_output=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"espeak-ng failed: {result.stderr.decode(errors='replace').strip()}")
    return parse_wav(result.stdout)


class EspeakHead:
    """Implements ``tts.base.TTSHead`` with espeak-ng voices (``en-us``, ``en-gb``, ...)."""

    name = "espeak"
    accepts: Literal["text", "speech_tokens"] = "text"

    def __init__(
        self, cfg: TTSConfig | None = None, *, output_rate: int | None = None, chunk_ms: int = 20
    ) -> None:
        self.cfg = cfg or TTSConfig(backend="espeak")
        espeak_binary()  # fail now, with the install hint, if it is missing
        self.default_voice = self.cfg.voice if self.cfg.voice in espeak_voices() else DEFAULT_VOICE
        _, self.synth_rate = espeak_synthesize("a", self.default_voice)
        self.output_rate = output_rate
        self.sample_rate = output_rate or self.synth_rate
        self.chunk_ms = chunk_ms
        self.segmenter = SegmenterConfig(
            first_piece_words=self.cfg.first_piece_words, max_piece_chars=self.cfg.max_piece_chars
        )

    def voices(self) -> list[str]:
        return list(espeak_voices())

    def synthesize(
        self, text: str, voice: str | None = None, speaking_rate: float = 1.0
    ) -> np.ndarray:
        """Whole-text synthesis (blocking; not for the event loop): float32 at ``sample_rate``."""
        audio, rate = espeak_synthesize(normalize(text), voice or self.default_voice, speaking_rate)
        return resample(audio, rate, self.sample_rate)

    def warmup(self) -> None:
        espeak_synthesize("Hello.", self.default_voice)

    def open_stream(
        self,
        voice: str | None = None,
        speaking_rate: float | None = None,
        output_rate: int | None = None,
    ) -> TextStream:
        name = voice or self.default_voice
        if name not in espeak_voices():
            raise ValueError(f"unknown espeak-ng voice {name!r} (see `espeak-ng --voices`)")
        rate = stream_speaking_rate(speaking_rate, self.cfg.speaking_rate)

        def synth(text: str) -> np.ndarray:
            audio, _ = espeak_synthesize(text, name, rate)
            return audio

        return TextStream(
            synth,
            self.synth_rate,
            output_rate=output_rate or self.output_rate,
            segmenter=self.segmenter,
            chunk_ms=self.chunk_ms,
            name="espeak",
        )
