"""Resampling to what the transport wants, with soxr.

Each segmenter piece is resampled on its own (pieces start and end in near silence, so no
filter state needs to cross them) on the stream's worker thread, never on the event loop.
"""

from __future__ import annotations

import numpy as np
import soxr

# Output rates of the transports the server speaks.
TRANSPORT_RATES = {"realtime": 24000, "webrtc": 48000, "telephony": 8000}


def resample(audio: np.ndarray, from_rate: int, to_rate: int, quality: str = "HQ") -> np.ndarray:
    """Mono ``audio`` (float32 in [-1, 1] or int16) from ``from_rate`` to ``to_rate`` Hz.

    The dtype is kept. ``quality`` is a soxr quality name ("QQ", "LQ", "MQ", "HQ", "VHQ").
    """
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio, got shape {audio.shape}")
    if from_rate == to_rate or audio.size == 0:
        return audio
    if audio.dtype == np.int16:
        out = soxr.resample(audio.astype(np.float32) / 32768.0, from_rate, to_rate, quality)
        return float_to_int16(out)
    return soxr.resample(audio.astype(np.float32, copy=False), from_rate, to_rate, quality)


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).astype(np.int16)
