"""G.711 mu-law / a-law and base64 PCM helpers for the WebSocket transports.

No maintained G.711 library is installed (``audioop`` is deprecated and gone in Python 3.13,
``audioop-lts`` only targets 3.13+), so the codecs are numpy lookup tables built once from the
ITU-T G.711 segment rules: 256-entry decode tables and 65536-entry encode tables indexed by
the int16 sample. Output is bit-identical to ``audioop.lin2ulaw`` / ``lin2alaw`` (tested).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import soxr

from realtime.audio import to_int16

_SEG_ULAW_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_SEG_ALAW_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


class AudioDecodeError(ValueError):
    """Client audio that cannot be decoded (bad base64, odd byte count, ...)."""


def _build_ulaw_encode() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2  # 14-bit
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 8159) + (0x84 >> 2)
    seg = np.searchsorted(_SEG_ULAW_END, mag, side="left")
    code = (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _build_alaw_encode() -> np.ndarray:
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3  # 13-bit
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    mag = np.where(pcm >= 0, pcm, -pcm - 1)
    seg = np.searchsorted(_SEG_ALAW_END, mag, side="left")
    segc = np.minimum(seg, 7)
    low = np.where(segc < 2, (mag >> 1) & 0xF, (mag >> segc) & 0xF)
    code = np.where(seg >= 8, 0x7F, (segc << 4) | low)
    return (code ^ mask).astype(np.uint8)


def _build_ulaw_decode() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _build_alaw_decode() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW_ENC = _build_ulaw_encode()
_ALAW_ENC = _build_alaw_encode()
_ULAW_DEC = _build_ulaw_decode()
_ALAW_DEC = _build_alaw_decode()


def _as_index(pcm: np.ndarray) -> np.ndarray:
    return np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples -> G.711 mu-law bytes."""
    return _ULAW_ENC[_as_index(pcm)].tobytes()


def alaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples -> G.711 a-law bytes."""
    return _ALAW_ENC[_as_index(pcm)].tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples."""
    return _ULAW_DEC[np.frombuffer(data, dtype=np.uint8)]


def alaw_decode(data: bytes) -> np.ndarray:
    """G.711 a-law bytes -> int16 samples."""
    return _ALAW_DEC[np.frombuffer(data, dtype=np.uint8)]


def b64decode_strict(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioDecodeError(f"audio is not valid base64: {exc}") from None


def pcm16_from_bytes(data: bytes) -> np.ndarray:
    """Little-endian 16-bit PCM bytes -> int16 samples; odd byte counts are rejected."""
    if len(data) % 2:
        raise AudioDecodeError(
            f"16-bit PCM needs an even number of bytes, got {len(data)} "
            "(is the audio in the format set by session.update?)"
        )
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def pcm16_to_b64(pcm: np.ndarray) -> str:
    return base64.b64encode(np.asarray(pcm, dtype="<i2").tobytes()).decode("ascii")


class StreamResampler:
    """Int16 mono resampling across chunk boundaries (soxr); a no-op when rates match."""

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate
        self._in_rate: int | None = None
        self._stream: soxr.ResampleStream | None = None

    def __call__(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        pcm = to_int16(np.asarray(pcm).reshape(-1))
        if rate == self.out_rate:
            return pcm
        if self._stream is None or rate != self._in_rate:
            self._in_rate = rate
            self._stream = soxr.ResampleStream(rate, self.out_rate, 1, dtype="int16")
        return self._stream.resample_chunk(pcm)

    def reset(self) -> None:
        self._stream = None
