"""Turn detection: WebRTC VAD endpointing into speech started / paused / stopped frames; with
``vad.end_of_turn.mode: semantic`` the turn model judges each pause (realtime/endpoint.py)."""

from __future__ import annotations

import collections
import time

from realtime.audio import PIPELINE_RATE
from realtime.context import SessionContext
from realtime.endpoint import RecentAudio, TurnClassifier
from realtime.frames import (
    ErrorFrame,
    Frame,
    InputAudio,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
)
from realtime.stages.base import Stage
from realtime.vad import Endpointer

TURN_LEAD_S = 0.5  # audio before the speech start the turn model hears (pipecat uses 0.5 s)


class TurnDetector(Stage):
    """VAD endpointing; also maps stream time to the wall time audio arrived."""

    def __init__(self, ctx: SessionContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.classifier: TurnClassifier | None = None
        self.endpointer = self._endpointer()
        self._recent = RecentAudio()
        self._t_speech = 0.0  # stream time the turn in progress started
        self._arrivals: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=500
        )
        self._unstopped = False  # manual turns: audio came since the last stop

    def _endpointer(self) -> Endpointer:
        vad = self.ctx.options.vad
        barge = self.ctx.config.barge_in
        self.classifier = (
            TurnClassifier(vad.end_of_turn) if vad.end_of_turn.mode == "semantic" else None
        )
        return Endpointer(
            vad,
            self.ctx.config.asr.speculative_after_ms,
            sustain_ms=barge.min_speech_ms if barge.mode == "hold" else None,
        )

    def reconfigure(self) -> None:
        self.endpointer = self._endpointer()

    def wall_at(self, t: float) -> float:
        """Wall time at which the sample at stream time ``t`` arrived."""
        prev_wall = None
        for t0, t1, wall in reversed(self._arrivals):
            if t0 <= t <= t1 + 1e-9:
                estimate = wall - (t1 - t)
                return max(estimate, prev_wall) if prev_wall is not None else estimate
            if t1 < t:
                break
            prev_wall = wall
        return time.monotonic()

    async def process(self, frame: Frame) -> None:
        if not isinstance(frame, InputAudio):
            await self.push(frame)
            return
        t1 = frame.t_start + len(frame.pcm) / PIPELINE_RATE
        self._arrivals.append((frame.t_start, t1, frame.wall_arrival))
        await self.push(frame)
        if not self.ctx.options.turn_detection:
            self._unstopped = True
            return
        if self.classifier is not None:
            self._recent.append(frame.pcm, frame.t_start)
        for ev in self.endpointer.process(frame.pcm):
            if ev.cut:
                limit = self.ctx.options.vad.max_turn_s
                await self.push(
                    ErrorFrame(
                        "turn_too_long",
                        f"the turn reached the limit of {limit:g} s (vad.max_turn_s) and was cut "
                        "there; it is answered as heard so far",
                    )
                )
            if ev.kind == "check":
                await self._check()
            else:
                await self._emit(ev.kind, ev.t, ev.t_decided)

    async def _check(self) -> None:
        """A pause: ask the turn model; the detector (only this session's) waits for it."""
        assert self.classifier is not None
        audio = self._recent.since(self._t_speech - TURN_LEAD_S)
        complete = await self.classifier.complete(audio)
        for ev in self.endpointer.verdict(complete):
            await self._emit(ev.kind, ev.t, ev.t_decided)

    async def _emit(self, kind: str, t: float, t_decided: float) -> None:
        if kind == "start":
            self._t_speech = t
            await self.push(SpeechStarted(t))
        elif kind == "sustained":
            await self.push(SpeechSustained(t))
        elif kind == "pause":
            await self.push(SpeechPaused(t))
        elif kind == "resume":
            await self.push(SpeechPaused(t, resumed=True))
        else:
            await self.push(
                SpeechStopped(
                    t, t_decided, self.wall_at(t), time.monotonic(), noise=kind == "discard"
                )
            )

    async def force_stop(self) -> None:
        """End of input, or a manual commit: end the turn in progress now."""
        if self.ctx.options.turn_detection:
            for ev in self.endpointer.force_stop():
                await self._emit(ev.kind, ev.t, ev.t_decided)
        elif self._unstopped:
            self._unstopped = False
            t = self.endpointer.now
            await self.push(SpeechStopped(t, t, time.monotonic(), time.monotonic()))

    def reset(self) -> None:
        self.endpointer.reset()
        self._recent.clear()
        self._unstopped = False
