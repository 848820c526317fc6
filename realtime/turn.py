"""Per-turn records the turn controller keeps: the clock of a user turn and of the agent's
response to it, and what of the response the user really heard."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from realtime.engine.base import CancelToken, UserTurn
from realtime.frames import OutputAudio, SpeechStopped


@dataclass
class TurnClock:
    """Wall times (time.monotonic()) of one user turn."""

    wall_speech_end: float | None = None  # the true end of the user's speech
    wall_decided: float | None = None  # when the endpointer decided the turn was over
    wall_transcript: float | None = None  # final transcript available

    def on_stopped(self, frame: SpeechStopped) -> None:
        self.wall_speech_end = frame.wall_end
        self.wall_decided = frame.wall_decided

    def on_transcript(self) -> None:
        self.wall_transcript = time.monotonic()


@dataclass
class ResponseClock:
    wall_start: float = field(default_factory=time.monotonic)
    wall_first_token: float | None = None
    wall_first_answer_token: float | None = None
    wall_last_token: float | None = None
    wall_audio_ready: float | None = None  # first audio chunk synthesised
    wall_released: float | None = None
    wall_first_audio: float | None = None  # first audio packet handed to the transport

    def on_token(self, answer: bool) -> None:
        now = time.monotonic()
        if self.wall_first_token is None:
            self.wall_first_token = now
        if answer and self.wall_first_answer_token is None:
            self.wall_first_answer_token = now
        self.wall_last_token = now

    def on_audio_ready(self) -> None:
        if self.wall_audio_ready is None:
            self.wall_audio_ready = time.monotonic()


@dataclass
class _Piece:
    text: str
    offset_s: float  # where this piece starts in the answer's audio


@dataclass
class Response:
    """One answer, from the controller's point of view."""

    id: int
    turn: UserTurn
    turn_clock: TurnClock
    speculative: bool
    cancel: CancelToken = field(default_factory=CancelToken)
    released: bool = False
    clock: ResponseClock = field(default_factory=ResponseClock)
    answer: str = ""
    thinking: str = ""
    failed: bool = False
    usage: dict[str, int] = field(default_factory=dict)
    pieces: list[_Piece] = field(default_factory=list)
    audio_s: float = 0.0  # audio handed to the transport

    def on_audio_out(self, frame: OutputAudio) -> None:
        if self.clock.wall_first_audio is None:
            self.clock.wall_first_audio = time.monotonic()
        if frame.text:
            self.pieces.append(_Piece(frame.text, self.audio_s))
        self.audio_s += len(frame.pcm) / frame.sample_rate

    def heard_s(self, paced: bool, lead_s: float = 0.0) -> float:
        """How much of the answer's audio the user has heard by now. Paced output: all that
        was handed out but the ``lead_s`` it runs ahead of real time (the listener's buffer).
        Unpaced output (the client buffers and plays it): the wall time since the first
        packet, at most what was handed out."""
        if paced:
            return max(0.0, self.audio_s - lead_s)
        first = self.clock.wall_first_audio
        return 0.0 if first is None else min(self.audio_s, time.monotonic() - first)

    def heard_text(self, heard_s: float) -> str:
        """The text of the pieces whose audio began within the first ``heard_s`` seconds."""
        return " ".join(p.text.strip() for p in self.pieces if p.offset_s < heard_s).strip()
