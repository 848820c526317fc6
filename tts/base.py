"""The streaming TTS protocol: text (or speech-token) deltas in, PCM chunks out.

A ``TTSHead`` is loaded once and shared by every session; ``open_stream`` gives one
``TTSStream`` per answer. Synthesis never runs on the event loop: a stream synthesises on
its own worker thread and hands chunks to the loop through an asyncio queue.

Nothing downstream assumes text: a head that speaks from speech tokens (Step-Audio 2's
``<audio_N>`` tokens through token2wav) declares ``accepts = "speech_tokens"`` and is fed
with ``push_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class AudioChunk:
    pcm: np.ndarray  # int16 mono
    sample_rate: int
    text: str = ""  # the text this chunk speaks ("" for all but the first chunk of a piece)
    piece_index: int = 0


@runtime_checkable
class TTSStream(Protocol):
    def push_text(self, delta: str) -> None:
        """Answer text as it is generated; may be called from any thread."""

    def push_tokens(self, token_ids: list[int]) -> None:
        """Speech tokens for a speech-token head; text heads raise NotImplementedError."""

    def finish(self) -> None:
        """No more input: synthesise what is left and end the chunk stream."""

    def chunks(self) -> AsyncIterator[AudioChunk]:
        """Audio as soon as each piece is synthesised; ends after ``finish`` or ``cancel``."""
        ...

    def cancel(self) -> None:
        """Stop now: no chunk is yielded after this returns. (What the user heard is known
        where the audio is played out, not here: see ``realtime.turn.Response``.)"""
        ...

    @property
    def cancelled(self) -> bool: ...


@runtime_checkable
class TTSHead(Protocol):
    name: str
    sample_rate: int
    accepts: Literal["text", "speech_tokens"]

    def open_stream(
        self,
        voice: str | None = None,
        speaking_rate: float | None = None,
        output_rate: int | None = None,
    ) -> TTSStream:
        """A stream for one answer. ``voice``/``speaking_rate``: None = the configured ones
        (``session.update``'s ``voice`` goes here; an unknown voice raises ValueError).
        ``output_rate``: the transport's sample rate (None = the head's ``sample_rate``)."""
        ...

    def voices(self) -> list[str]: ...

    def warmup(self) -> None: ...


def stream_speaking_rate(requested: float | None, configured: float) -> float:
    """The speaking rate of one stream: the requested one, else the configured one."""
    rate = requested if requested is not None else configured
    if rate <= 0:
        raise ValueError("speaking_rate must be positive")
    return rate
