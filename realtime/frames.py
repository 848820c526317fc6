"""The typed frames that flow through a session's pipeline.

Data path, top to bottom:
    transport -> VAD -> listener -> turn controller -> engine -> TTS -> output -> transport.

Frames are immutable. Times named ``t_*`` are *stream* seconds (position in the user's
audio, sample count / 16000); times named ``wall_*`` are ``time.monotonic()`` seconds.

Every frame of an answer (text, audio, tool calls, its errors) carries the ``response_id``
the turn controller gave it, so no stage has to guess which answer a frame belongs to. The
controller steers the stages below it with *control* frames (``StartResponse``,
``ReleaseResponse``, ``CancelResponse``, ``CommitTurn``, ``DiscardTurn``): they never reach
the transport. Frames of a cancelled answer still in flight are dropped by the output stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realtime.engine.base import CancelToken, UserTurn


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

    response_id: int
    pcm: np.ndarray
    sample_rate: int
    text: str = ""


@dataclass(frozen=True, slots=True)
class TurnAudio(Frame):
    """Audio of the user's turn in progress, from the speech-start padding on (the listener's
    view of the turn): what an engine that hears audio pre-fills while the user speaks."""

    pcm: np.ndarray


@dataclass(frozen=True, slots=True)
class SpeechStarted(Frame):
    t: float  # stream time speech began (prefix padding not included)


@dataclass(frozen=True, slots=True)
class SpeechSustained(Frame):
    """The speech that started at ``t`` has gone on for ``barge_in.min_speech_ms``: long
    enough to be more than a backchannel."""

    t: float


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
    # the mean token log probability of the decode of the turn's last phrase (None: not scored)
    avg_logprob: float | None = None
    t_end: float | None = None  # stream time the decoded audio ends at (None: not known)


@dataclass(frozen=True, slots=True)
class ThinkingText(Frame):
    response_id: int
    text: str  # a delta of the reasoning block


@dataclass(frozen=True, slots=True)
class AnswerText(Frame):
    response_id: int
    text: str  # a delta of the answer
    end: bool = False  # the answer is complete (after the TTS stage: its audio too)
    usage: dict[str, int] = field(default_factory=dict)  # end: the engine's token counts


@dataclass(frozen=True, slots=True)
class ToolCall(Frame):
    """The model called a declared tool: no audio is spoken for it; the client runs it and
    returns the output (``Session.add_tool_result``) for the next answer."""

    response_id: int
    call_id: str
    name: str
    arguments: str  # a JSON object, as text
    text: str = ""  # the raw payload between the model's call markers


@dataclass(frozen=True, slots=True)
class ToolOutput(Frame):
    """The client returned a tool's output (it goes to the engine with the next answer);
    shown to the user (the browser's reasoning panel), never spoken."""

    call_id: str
    name: str
    output: str


# ---- control frames (turn controller -> engine, TTS and output stages) -------------------------
@dataclass(frozen=True, slots=True)
class StartResponse(Frame):
    """Answer ``turn``. A speculative answer is generated and synthesised but held back by the
    output stage until a ``ReleaseResponse`` (or dropped by a ``CancelResponse``)."""

    response_id: int
    turn: UserTurn
    speculative: bool
    cancel: CancelToken  # set by the controller; the engine stops within one step


@dataclass(frozen=True, slots=True)
class ReleaseResponse(Frame):
    response_id: int  # the user's turn really ended: the answer may be heard


@dataclass(frozen=True, slots=True)
class CancelResponse(Frame):
    response_id: int  # stop generating and synthesising; drop what is queued


@dataclass(frozen=True, slots=True)
class CommitTurn(Frame):
    """The turn is over: the engine records it with the answer as the user really heard it."""

    turn: UserTurn
    spoken: str
    interrupted: bool


@dataclass(frozen=True, slots=True)
class DiscardTurn(Frame):
    """The speech was a false start (noise) or the client cleared it: the engine forgets the
    audio it heard of this turn."""


@dataclass(frozen=True, slots=True)
class ReviseTurn(Frame):
    """Change an earlier turn of the engine's history (``turn``: its index among the turns
    committed in this session, from 0): the answer as heard (``answer``), or forget the
    user's part or the answer (conversation.item.truncate / delete)."""

    turn: int
    answer: str | None = None
    forget_user: bool = False
    forget_answer: bool = False


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
    usage: dict[str, int] = field(default_factory=dict)  # the engine's token counts
    response_id: int | None = None  # the answer these figures are of
    audio_s: float = 0.0  # seconds of the answer's audio handed to the transport


@dataclass(frozen=True, slots=True)
class ErrorFrame(Frame):
    code: str
    message: str
    fatal: bool = False
    response_id: int | None = None  # the answer that failed, if the error is an answer's


@dataclass(frozen=True, slots=True)
class Dtmf(Frame):
    """A key the caller pressed on the phone's keypad (telephony DTMF): 0-9, *, #, A-D."""

    digit: str


@dataclass(frozen=True, slots=True)
class EndFrame(Frame):
    """The input has ended (file finished, client left); flush and stop."""

    reason: str = ""


def answer_id(frame: Frame) -> int | None:
    """The response a frame of an answer belongs to (text, audio, tool call, or its error);
    None for every other frame."""
    if isinstance(frame, (AnswerText, ThinkingText, ToolCall, OutputAudio, ErrorFrame)):
        return frame.response_id
    return None


def frame_to_event(frame: Frame) -> dict[str, Any] | None:
    """The JSON-lines event of a frame (``run_agent.py --json`` and the data channel)."""
    if isinstance(frame, Transcript):
        return {"event": "transcript", "text": frame.text, "final": frame.final}
    if isinstance(frame, ThinkingText):
        return {"event": "thinking", "text": frame.text}
    if isinstance(frame, AnswerText):
        return None if frame.end else {"event": "answer", "text": frame.text}
    if isinstance(frame, ToolCall):
        return {
            "event": "tool_call",
            "call_id": frame.call_id,
            "name": frame.name,
            "arguments": frame.arguments,
        }
    if isinstance(frame, ToolOutput):
        return {
            "event": "tool_result",
            "call_id": frame.call_id,
            "name": frame.name,
            "output": frame.output,
        }
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
    if isinstance(frame, Dtmf):
        return {"event": "dtmf", "digit": frame.digit}
    return None
