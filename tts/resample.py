"""The output rates of the transports the server speaks. Resampling itself is
``realtime.audio.resample`` (soxr), run piece by piece on each stream's worker thread: pieces
start and end in near silence, so no filter state needs to cross them."""

from __future__ import annotations

from realtime.audio import resample

__all__ = ["TRANSPORT_RATES", "resample"]

TRANSPORT_RATES = {"realtime": 24000, "webrtc": 48000, "telephony": 8000}
