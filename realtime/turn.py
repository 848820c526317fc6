"""Per-turn state: the clock of a user turn and the agent's response to it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from realtime.engine.base import CancelToken, UserTurn
from realtime.frames import Frame, OutputAudio, SpeechStopped
from tts.base import TTSStream


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
    wall_audio_ready: float | None = None  # first audio chunk synthesised
    wall_released: float | None = None
    wall_first_audio: float | None = None  # first audio packet handed to the transport

    def on_token(self, kind: str) -> None:
        now = time.monotonic()
        if self.wall_first_token is None:
            self.wall_first_token = now
        if kind == "answer" and self.wall_first_answer_token is None:
            self.wall_first_answer_token = now

    def on_audio_ready(self) -> None:
        if self.wall_audio_ready is None:
            self.wall_audio_ready = time.monotonic()


@dataclass
class _Piece:
    text: str
    offset_s: float  # where this piece starts in the answer's audio


@dataclass
class Response:
    id: int
    turn: UserTurn
    turn_clock: TurnClock
    speculative: bool
    cancel: CancelToken = field(default_factory=CancelToken)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    clock: ResponseClock = field(default_factory=ResponseClock)
    answer: str = ""
    thinking: str = ""
    failed: bool = False
    tts: TTSStream | None = None
    tts_task: asyncio.Task[None] | None = None
    task: asyncio.Task[None] | None = None
    held: list[Frame] = field(default_factory=list)
    pieces: list[_Piece] = field(default_factory=list)
    audio_s: float = 0.0  # audio handed to the transport
    played_pieces: int = 0  # pieces whose audio started playing (paced output)

    def on_played(self, frame: OutputAudio, paced: bool) -> None:
        if self.clock.wall_first_audio is None:
            self.clock.wall_first_audio = time.monotonic()
        if frame.text:
            self.pieces.append(_Piece(frame.text, self.audio_s))
            if paced:
                self.played_pieces = len(self.pieces)
        self.audio_s += len(frame.pcm) / frame.sample_rate

    def spoken_text(self, paced: bool, heard_s: float | None = None) -> str:
        """The text of the pieces whose audio the user began to hear.

        Paced output: pieces that were played. Unpaced output (the client buffers): pieces
        that started within ``heard_s`` (default: wall time since the first packet).
        """
        if heard_s is None and paced:
            return " ".join(p.text.strip() for p in self.pieces[: self.played_pieces]).strip()
        if heard_s is None:
            first = self.clock.wall_first_audio
            heard_s = 0.0 if first is None else time.monotonic() - first
        return " ".join(p.text.strip() for p in self.pieces if p.offset_s < heard_s).strip()
