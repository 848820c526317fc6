"""Streaming text-to-speech heads: text (or speech-token) deltas in, PCM chunks out.

head = load_tts(cfg.tts, output_rate=24000)   # once, at startup; then head.warmup()
stream = head.open_stream(voice=None, speaking_rate=None)   # one per answer
stream.push_text(delta) ... stream.finish()  # any thread
async for chunk in stream.chunks(): ...      # event loop; 20 ms int16 chunks
report = stream.cancel()                     # barge-in: what was really emitted
"""

from __future__ import annotations

import logging

from realtime.config import TTSConfig
from tts.base import AudioChunk, TTSHead, TTSStream

log = logging.getLogger(__name__)

__all__ = ["AudioChunk", "TTSHead", "TTSStream", "load_tts"]


def load_tts(cfg: TTSConfig, output_rate: int | None = None, chunk_ms: int = 20) -> TTSHead:
    """The configured head. ``output_rate``: what the transport wants (None: the voice's own).

    Piper falls back to espeak-ng (with a warning) only when Piper or onnxruntime is not
    installed; a bad voice name or path is an error.
    """
    if cfg.backend == "piper":
        try:
            import onnxruntime  # noqa: F401
            import piper  # noqa: F401
        except ImportError as exc:
            log.warning("Piper is not available (%s): falling back to espeak-ng", exc)
        else:
            from tts.piper_backend import PiperHead

            return PiperHead(cfg, output_rate=output_rate, chunk_ms=chunk_ms)
    from tts.espeak_backend import EspeakHead

    return EspeakHead(cfg, output_rate=output_rate, chunk_ms=chunk_ms)
