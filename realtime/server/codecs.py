"""G.711 mu-law / A-law (FFmpeg's ``pcm_mulaw`` / ``pcm_alaw`` through PyAV) and base64 PCM
helpers for the WebSocket transports.

Decoding is bit-identical to ``audioop.ulaw2lin`` / ``alaw2lin``. FFmpeg's encoder rounds some
samples at a quantisation step's edge to the neighbouring level where ``audioop`` (the ITU-T
reference) truncates: 0.8% (mu-law) and 1.5% (A-law) of int16 values get a code one
level away (tested). Any G.711
decoder plays either code.
"""

from __future__ import annotations

import base64
import binascii

import av
import numpy as np

G711_RATE = 8000  # the codecs themselves do not care; FFmpeg needs a rate set


class AudioDecodeError(ValueError):
    """Client audio that cannot be decoded (bad base64, odd byte count, ...)."""


def _encode(codec: str, pcm: np.ndarray) -> bytes:
    samples = np.ascontiguousarray(np.asarray(pcm, dtype=np.int16).reshape(1, -1))
    if samples.size == 0:
        return b""
    ctx = av.CodecContext.create(codec, "w")
    ctx.sample_rate = G711_RATE
    ctx.layout = "mono"
    ctx.format = "s16"
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
    frame.sample_rate = G711_RATE
    return b"".join(bytes(packet) for packet in ctx.encode(frame))


def _decode(codec: str, data: bytes) -> np.ndarray:
    if not data:  # an empty packet would mean "end of stream" to FFmpeg
        return np.zeros(0, dtype=np.int16)
    ctx = av.CodecContext.create(codec, "r")
    ctx.sample_rate = G711_RATE
    ctx.layout = "mono"
    frames = ctx.decode(av.Packet(bytes(data)))
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16)


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples -> G.711 mu-law bytes."""
    return _encode("pcm_mulaw", pcm)


def alaw_encode(pcm: np.ndarray) -> bytes:
    """int16 samples -> G.711 A-law bytes."""
    return _encode("pcm_alaw", pcm)


def ulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples."""
    return _decode("pcm_mulaw", data)


def alaw_decode(data: bytes) -> np.ndarray:
    """G.711 A-law bytes -> int16 samples."""
    return _decode("pcm_alaw", data)


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
