"""The last stage: held, released and dropped answers, real-time pacing, and the report of
what went out to the turn controller."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from realtime.context import SessionContext
from realtime.frames import (
    AnswerText,
    CancelResponse,
    Frame,
    OutputAudio,
    ReleaseResponse,
    StartResponse,
    TurnAudio,
    answer_id,
)
from realtime.stages.base import CONTROL_FRAMES, Stage


class OutputObserver(Protocol):
    def on_output(self, frame: Frame, played: bool) -> None:
        """A frame of an answer reached the output (``played=False``), or went out to the
        transport (``played=True``: audio handed out, or the answer's end after its audio)."""


@dataclass
class _Answer:
    released: bool = False
    held: list[Frame] = field(default_factory=list)


class Output(Stage):
    """Holds a speculative answer until it is released, paces audio in real time when asked,
    drops what belongs to cancelled answers, and hands frames to the transport."""

    def __init__(self, ctx: SessionContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.observer: OutputObserver | None = None
        self._answers: dict[int, _Answer] = {}
        self._play: asyncio.Queue[Frame] = asyncio.Queue()
        self._player: asyncio.Task[None] | None = None

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, StartResponse):
            self._answers[frame.response_id] = _Answer()
        elif isinstance(frame, ReleaseResponse):
            answer = self._answers.get(frame.response_id)
            if answer is not None and not answer.released:
                answer.released = True
                held, answer.held = answer.held, []
                for f in held:
                    await self._deliver(f)
        elif isinstance(frame, CancelResponse):
            self._answers.pop(frame.response_id, None)
            self.flush()
        elif isinstance(frame, CONTROL_FRAMES + (TurnAudio,)):
            pass  # control never reaches the transport
        elif (rid := answer_id(frame)) is not None:
            answer = self._answers.get(rid)
            if answer is None:
                return  # an answer that was cancelled meanwhile
            self._observe(frame, played=False)
            if answer.released:
                await self._deliver(frame)
            else:
                answer.held.append(frame)
        else:
            await self.push(frame)

    def _observe(self, frame: Frame, played: bool) -> None:
        if self.observer is not None:
            self.observer.on_output(frame, played)

    async def _deliver(self, frame: Frame) -> None:
        """Audio and the answer's end keep their order (and pace); text goes out at once."""
        if not isinstance(frame, (OutputAudio, AnswerText)) or (
            isinstance(frame, AnswerText) and not frame.end
        ):
            await self.push(frame)
        elif self.ctx.pace_output:
            if self._player is None or self._player.done():
                self._player = self.ctx.spawn(self._play_loop())
            self._play.put_nowait(frame)
        else:
            await self._emit(frame)

    async def _emit(self, frame: Frame) -> None:
        rid = answer_id(frame)
        if rid not in self._answers:
            return  # cancelled while queued
        if isinstance(frame, OutputAudio):
            self._observe(frame, played=True)
            await self.push(frame)
        elif isinstance(frame, AnswerText) and frame.end:
            del self._answers[rid]
            self._observe(frame, played=True)

    async def _play_loop(self) -> None:
        """Emit audio frames at real-time pace, up to the session's ``output_lead_s`` ahead of
        it (a listener's play-out buffer: a phone call): the first frame goes at once and the
        lead fills right away; then a frame goes when the listener is within the lead of
        needing it. A barge-in then drops all but the lead (and one frame)."""
        next_at: float | None = None  # when the listener has played all handed out so far
        while True:
            frame = await self._play.get()
            if isinstance(frame, OutputAudio):
                now = time.monotonic()
                if next_at is None or now > next_at + 0.1:
                    next_at = now  # first frame, or the producer starved us: restart the clock
                elif (wait := next_at - self.ctx.options.output_lead_s - now) > 0:
                    await asyncio.sleep(wait)
                next_at += len(frame.pcm) / frame.sample_rate
            await self._emit(frame)

    def flush(self) -> None:
        """Drop queued audio at once (barge-in)."""
        while not self._play.empty():
            self._play.get_nowait()
