"""Streaming recognition: the turn's audio and its transcripts, while the user speaks."""

from __future__ import annotations

import collections

import numpy as np

from realtime.audio import PIPELINE_RATE
from realtime.context import SessionContext
from realtime.frames import (
    Frame,
    InputAudio,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    TurnAudio,
)
from realtime.listener import Listener
from realtime.stages.base import Stage


class ListenerStage(Stage):
    """Streaming recognition of the user's turn. Turns the user's audio into ``TurnAudio``
    (from the speech-start padding on) and transcripts: partial ones while the user speaks, a
    candidate at each pause, the final one at the end of the turn."""

    def __init__(self, ctx: SessionContext, listener: Listener) -> None:
        super().__init__()
        self.ctx = ctx
        self.listener = listener
        self._recent: collections.deque[InputAudio] = collections.deque()

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, InputAudio):
            self._remember(frame)
            if not self.ctx.options.turn_detection and not self.listener.active:
                self.listener.start(frame.t_start, np.zeros(0, np.float32))
            if self.listener.active:
                self.listener.append(frame.pcm)
                await self.push(TurnAudio(frame.pcm))
                self.ctx.spawn(self._partial())
            return  # the user's own audio goes no further
        await self.push(frame)
        if isinstance(frame, SpeechStarted):
            t0, prefix = self._prefix(frame.t)
            self.listener.start(t0, prefix)
            if prefix.size:
                await self.push(TurnAudio(prefix))
        elif isinstance(frame, SpeechPaused):
            if frame.resumed:
                self.listener.on_resume(frame.t)
            else:
                self.listener.on_pause(frame.t)
                self.ctx.spawn(self._candidate())
        elif isinstance(frame, SpeechStopped):
            if frame.noise:
                self.listener.reset()
            else:
                self.ctx.spawn(self._final())

    def _remember(self, frame: InputAudio) -> None:
        keep_s = self.ctx.options.vad.prefix_padding_ms / 1000 + 0.5
        self._recent.append(frame)
        while self._recent and frame.t_start - self._recent[0].t_start > keep_s:
            self._recent.popleft()

    def _prefix(self, t_speech: float) -> tuple[float, np.ndarray]:
        """Audio from ``prefix_padding_ms`` before speech started up to now."""
        if not self._recent:
            return t_speech, np.zeros(0, np.float32)
        pad_s = self.ctx.options.vad.prefix_padding_ms / 1000
        t0 = max(self._recent[0].t_start, t_speech - pad_s)
        pcm = np.concatenate([f.pcm for f in self._recent])
        k = int(round((t0 - self._recent[0].t_start) * PIPELINE_RATE))
        return t0, pcm[max(0, k) :]

    async def _partial(self) -> None:
        heard = await self.listener.maybe_partial()
        if heard is not None and heard.text:
            await self.push(Transcript(heard.text, False, False, heard.avg_logprob, heard.t_end))

    async def _candidate(self) -> None:
        heard = await self.listener.candidate()
        if heard is not None:
            await self.push(Transcript(heard.text, False, True, heard.avg_logprob, heard.t_end))

    async def _final(self) -> None:
        heard = await self.listener.finish()
        await self.push(Transcript(heard.text, True, False, heard.avg_logprob, heard.t_end))
