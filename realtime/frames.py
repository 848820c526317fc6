"""The typed frames that flow through a session's pipeline.

Data path, top to bottom:  transport -> VAD -> listener -> engine -> TTS -> transport.

Frames are immutable. Times named ``t_*`` are *stream* seconds (position in the user's
audio, sample count / 16000); times named ``wall_*`` are ``time.monotonic()`` seconds.
System frames (``SYSTEM_FRAMES``) survive an interruption; data frames queued behind an
interruption are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """Base class of everything that moves through the pipeline."""


@dataclass(frozen=True, slots=True)
class InputAudio(Frame):
    """User audio already converted to 16 kHz mono float32 in [-1, 1]."""

    pcm: np.ndarray
    t_start: float  # stream time of the first sample
    wall_arrival: float  # when the last sample of this chunk arrived


@dataclass(frozen=True, slots=True)
class OutputAudio(Frame):
    """Agent audio, int16 mono, at ``sample_rate``. ``text`` is what this piece says."""

    pcm: np.ndarray
    sample_rate: int
    text: str = ""


@dataclass(frozen=True, slots=True)
class SpeechStarted(Frame):
    t: float  # stream time speech began (prefix padding not included)


@dataclass(frozen=True, slots=True)
class SpeechStopped(Frame):
    t_end: float  # stream time of the end of the last voiced frame (the true end)
    t_decided: float  # stream time at which the silence wait ran out
    wall_end: float  # wall time when the last voiced sample arrived
    wall_decided: float  # wall time when the endpointer decided
    noise: bool = False  # too short to be speech: nothing to answer


@dataclass(frozen=True, slots=True)
class SpeechPaused(Frame):
    """A short silence inside a turn (not yet the endpoint), or the speech that ended it."""

    t: float  # stream time of the end of the last voiced frame
    resumed: bool = False  # True: the user went on speaking after the pause


@dataclass(frozen=True, slots=True)
class Transcript(Frame):
    text: str
    final: bool
    candidate: bool = False  # the whole turn's text if the user stops now (decoded at a pause)


@dataclass(frozen=True, slots=True)
class ThinkingText(Frame):
    text: str  # a delta of the reasoning block


@dataclass(frozen=True, slots=True)
class AnswerText(Frame):
    text: str  # a delta of the answer
    end: bool = False  # the answer is complete (after the TTS stage: its audio too)


@dataclass(frozen=True, slots=True)
class ToolCall(Frame):
    text: str  # the raw tool-call payload between the call markers


@dataclass(frozen=True, slots=True)
class Interruption(Frame):
    """The user barged in: the answer in flight is cancelled."""

    spoken_text: str = ""  # the part of the answer the user really heard


@dataclass(frozen=True, slots=True)
class TurnMetrics(Frame):
    turn: int
    first_packet_s: float | None  # first audio packet minus the true end of speech
    breakdown: dict[str, float | None] = field(default_factory=dict)
    interrupted: bool = False
    transcript: str = ""
    answer: str = ""
    spoken: str = ""


@dataclass(frozen=True, slots=True)
class ErrorFrame(Frame):
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class EndFrame(Frame):
    """The input has ended (file finished, client left); flush and stop."""

    reason: str = ""


SYSTEM_FRAMES: tuple[type[Frame], ...] = (
    SpeechStarted,
    SpeechPaused,
    SpeechStopped,
    Interruption,
    TurnMetrics,
    ErrorFrame,
    EndFrame,
)


def frame_to_event(frame: Frame) -> dict[str, Any] | None:
    """The JSON-lines event of a frame (``run_agent.py --json`` and the data channel)."""
    if isinstance(frame, Transcript):
        return {"event": "transcript", "text": frame.text, "final": frame.final}
    if isinstance(frame, ThinkingText):
        return {"event": "thinking", "text": frame.text}
    if isinstance(frame, AnswerText):
        return None if frame.end else {"event": "answer", "text": frame.text}
    if isinstance(frame, ToolCall):
        return {"event": "tool_call", "text": frame.text}
    if isinstance(frame, SpeechStarted):
        return {"event": "speech_started", "t": round(frame.t, 3)}
    if isinstance(frame, SpeechStopped):
        return {
            "event": "speech_stopped",
            "t": round(frame.t_end, 3),
            "t_decided": round(frame.t_decided, 3),
        }
    if isinstance(frame, Interruption):
        return {"event": "interrupted", "spoken": frame.spoken_text}
    if isinstance(frame, TurnMetrics):
        return {
            "event": "turn",
            "turn": frame.turn,
            "first_packet_s": None
            if frame.first_packet_s is None
            else round(frame.first_packet_s, 3),
            "breakdown": {
                k: (None if v is None else round(v, 3)) for k, v in frame.breakdown.items()
            },
            "interrupted": frame.interrupted,
            "transcript": frame.transcript,
            "answer": frame.answer,
            "spoken": frame.spoken,
        }
    if isinstance(frame, ErrorFrame):
        return {"event": "error", "code": frame.code, "message": frame.message}
    if isinstance(frame, EndFrame):
        return {"event": "end", "reason": frame.reason}
    return None
