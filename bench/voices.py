"""Test speech in voices the project was never tuned on: espeak-ng and flite (Debian packages),
at several speaking rates. Each voice is ``engine:name@rate``:

    espeak:en-us@175      espeak-ng voice ``en-us`` at 175 words per minute
    espeak:en-gb-x-rp+f3@140
    flite:slt@1.2         flite voice ``slt``, durations stretched 1.2x (slower)

The project's own tuning used Piper's ``joe`` voice (bench/cpu_bench.py); none of these.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import soxr

RATE = 16000

# a mixed set: two engines, male and female variants, slow to fast
DEFAULT_VOICES = (
    "espeak:en-us@165",
    "espeak:en-gb-x-rp+f3@140",
    "espeak:en-us+m7@195",
    "espeak:en-029@175",
    "flite:slt@1.0",
    "flite:kal@1.15",
    "flite:awb@0.9",
    "flite:rms@1.0",
)

# asked of the pipeline benchmark; none of them is in bench/questions.py (the tuning set)
QUESTIONS = (
    "What is the largest ocean on Earth?",
    "How many days are there in a leap year?",
    "Who painted the Mona Lisa?",
    "What do bees make?",
    "Can you name three primary colors?",
    "What is the freezing point of water in Fahrenheit?",
    "Which planet is closest to the sun?",
    "How do I boil an egg?",
)


def available(voice: str) -> bool:
    engine = voice.split(":", 1)[0]
    return shutil.which({"espeak": "espeak-ng", "flite": "flite"}[engine]) is not None


def synthesize(text: str, voice: str) -> np.ndarray:
    """``text`` spoken by ``voice``: float32 mono at 16 kHz."""
    engine, rest = voice.split(":", 1)
    name, _, rate = rest.partition("@")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        if engine == "espeak":
            cmd = ["espeak-ng", "-v", name, "-s", rate or "175", "-w", str(path), text]
        elif engine == "flite":
            cmd = ["flite", "-voice", name, "--setf", f"duration_stretch={rate or '1.0'}"]
            cmd += ["-t", text, "-o", str(path)]
        else:
            raise ValueError(f"unknown TTS engine {engine!r} in voice {voice!r}")
        subprocess.run(cmd, check=True, capture_output=True)
        with wave.open(str(path)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
            src = w.getframerate()
    x = pcm.astype(np.float32) / 32768.0
    return soxr.resample(x, src, RATE).astype(np.float32) if src != RATE else x


def speech_end(pcm: np.ndarray, rate: int = RATE) -> float:
    """Seconds to the end of the last 10 ms frame louder than -40 dBFS: the true end of
    speech, taken from the clip itself, not from the pipeline's VAD."""
    hop = rate // 100
    frames = pcm[: len(pcm) // hop * hop].reshape(-1, hop)
    loud = np.where(np.sqrt((frames**2).mean(axis=1)) > 0.01)[0]
    return (int(loud[-1]) + 1) / 100 if loud.size else 0.0
