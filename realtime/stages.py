"""The five stages of a session, in data-path order:

    TurnDetector -> ListenerStage -> Responder -> Speaker -> Output -> (transport)

Each stage handles the frames it cares about and pushes every frame on, so the transport sees
the whole story. Long work (recognition, decoding, synthesis) runs in tasks that push frames
when results arrive; the blocking parts of that work run on threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from realtime.audio import PIPELINE_RATE, to_int16
from realtime.engine.base import UserTurn
from realtime.frames import (
    AnswerText,
    ErrorFrame,
    Frame,
    InputAudio,
    OutputAudio,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    ThinkingText,
    ToolCall,
    Transcript,
)
from realtime.listener import Listener
from realtime.turn import Response
from realtime.vad import Endpointer

if TYPE_CHECKING:
    from realtime.session import Session

log = logging.getLogger(__name__)


class Stage:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.next: Stage | None = None

    async def process(self, frame: Frame) -> None:
        await self.push(frame)

    async def push(self, frame: Frame) -> None:
        if self.next is not None:
            await self.next.process(frame)


class TurnDetector(Stage):
    """VAD endpointing; also maps stream time to the wall time audio arrived."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.endpointer = Endpointer(
            session.options.vad, session.runtime.config.asr.speculative_after_ms
        )
        self._arrivals: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=500
        )

    def reconfigure(self) -> None:
        self.endpointer = Endpointer(
            self.session.options.vad, self.session.runtime.config.asr.speculative_after_ms
        )

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
        if not self.session.options.turn_detection:
            return
        for ev in self.endpointer.process(frame.pcm):
            await self._emit(ev.kind, ev.t, ev.t_decided)

    async def _emit(self, kind: str, t: float, t_decided: float) -> None:
        if kind == "start":
            await self.push(SpeechStarted(t))
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
        if self.session.options.turn_detection:
            for ev in self.endpointer.force_stop():
                await self._emit(ev.kind, ev.t, ev.t_decided)
        elif self.session.listener.active:
            t = self.endpointer.now
            await self.push(SpeechStopped(t, t, time.monotonic(), time.monotonic()))


class ListenerStage(Stage):
    """Streaming recognition of the user's turn."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.listener: Listener = session.listener
        pad_s = session.options.vad.prefix_padding_ms / 1000 + 0.5
        self._recent: collections.deque[InputAudio] = collections.deque()
        self._recent_s = pad_s

    async def process(self, frame: Frame) -> None:
        s = self.session
        if isinstance(frame, InputAudio):
            self._remember(frame)
            if not s.options.turn_detection and not self.listener.active:
                self.listener.start(frame.t_start, np.zeros(0, np.float32))
            self.listener.append(frame.pcm)
            s.spawn(self._partial())
        elif isinstance(frame, SpeechStarted):
            self.listener.start(*self._prefix(frame.t))
        elif isinstance(frame, SpeechPaused):
            if frame.resumed:
                self.listener.on_resume(frame.t)
            else:
                self.listener.on_pause(frame.t)
                s.spawn(self._candidate())
        elif isinstance(frame, SpeechStopped):
            await self.push(frame)
            if frame.noise:
                self.listener.reset()
            else:
                s.spawn(self._final())
            return
        await self.push(frame)

    def _remember(self, frame: InputAudio) -> None:
        self._recent.append(frame)
        while self._recent and frame.t_start - self._recent[0].t_start > self._recent_s:
            self._recent.popleft()

    def _prefix(self, t_speech: float) -> tuple[float, np.ndarray]:
        """Audio from ``prefix_padding_ms`` before speech started up to now."""
        if not self._recent:
            return t_speech, np.zeros(0, np.float32)
        t0 = max(
            self._recent[0].t_start, t_speech - self.session.options.vad.prefix_padding_ms / 1000
        )
        pcm = np.concatenate([f.pcm for f in self._recent])
        k = int(round((t0 - self._recent[0].t_start) * PIPELINE_RATE))
        return t0, pcm[max(0, k) :]

    async def _partial(self) -> None:
        text = await self.listener.maybe_partial()
        if text:
            await self.push(Transcript(text, final=False))

    async def _candidate(self) -> None:
        text = await self.listener.candidate()
        if text is not None:
            await self.push(Transcript(text, final=False, candidate=True))

    async def _final(self) -> None:
        audio = self.listener.turn_audio()
        text = await self.listener.final()
        self.listener.reset()
        self.session.last_turn_audio = audio
        await self.push(Transcript(text, final=True))


class Responder(Stage):
    """Runs the engine: speculative answers at pauses, the real one at the endpoint."""

    async def process(self, frame: Frame) -> None:
        s = self.session
        if isinstance(frame, InputAudio):
            if s.engine_listens and s.listener.active:
                s.runtime.worker.submit(lambda pcm=frame.pcm: s.engine_session.listen(pcm))
        elif isinstance(frame, SpeechStarted):
            await self.push(frame)
            await s.on_user_speech()
            return
        elif isinstance(frame, SpeechPaused) and frame.resumed:
            s.drop_speculation()
        elif isinstance(frame, SpeechStopped):
            s.clock.on_stopped(frame)
            if frame.noise:
                s.drop_speculation()
            else:
                s.open_turn()
        elif isinstance(frame, Transcript) and frame.candidate:
            if s.options.create_response and s.runtime.config.engine.speculative:
                await self.push(frame)
                s.start_response(UserTurn(text=frame.text), speculative=True)
                return
        elif isinstance(frame, Transcript) and frame.final:
            s.clock.on_transcript()
            await self.push(frame)
            await s.on_final_transcript(frame.text)
            return
        await self.push(frame)

    async def run(self, resp: Response) -> None:
        """Stream the engine's tokens for ``resp`` as frames."""
        s = self.session
        try:
            stream = s.runtime.worker.stream(
                lambda: s.engine_session.respond(resp.turn, resp.cancel),
                exclusive=not getattr(s.runtime.engine, "interleaved_responses", False),
            )
            async for ev in stream:
                if resp.cancel.cancelled:
                    continue  # drain: the worker stops within one step
                resp.clock.on_token(ev.kind)
                if ev.kind == "answer":
                    resp.answer += ev.text
                    await self.push(AnswerText(ev.text))
                elif ev.kind == "thinking":
                    resp.thinking += ev.text
                    await self.push(ThinkingText(ev.text))
                elif ev.kind == "tool_call":
                    await self.push(ToolCall(ev.text))
        except Exception as exc:
            log.exception("engine failed")
            if not resp.cancel.cancelled:
                resp.failed = True
                await self.push(ErrorFrame("engine_error", f"the reply engine failed: {exc}"))
        if not resp.cancel.cancelled:
            await self.push(AnswerText("", end=True))


class Speaker(Stage):
    """Streams answer text into the TTS head and its audio on in output-sized frames (a
    text-only session, ``speak=False``, passes the text on untouched)."""

    async def process(self, frame: Frame) -> None:
        s = self.session
        resp = s.response
        if (
            isinstance(frame, AnswerText)
            and resp is not None
            and not resp.cancel.cancelled
            and s.options.speak
        ):
            if resp.tts is None:
                resp.tts = s.runtime.tts.open_stream(
                    s.options.voice,
                    s.options.speaking_rate,
                    output_rate=s.options.output_sample_rate,
                )  # resampled to the transport's rate on the TTS thread
                resp.tts_task = s.spawn(self._pump(resp))
            if frame.end:
                resp.tts.finish()
                return  # re-sent by _pump after the last audio
            resp.tts.push_text(frame.text)
        await self.push(frame)

    async def _pump(self, resp: Response) -> None:
        s = self.session
        assert resp.tts is not None
        frame_s = s.runtime.config.audio.output_frame_ms / 1000
        try:
            async for chunk in resp.tts.chunks():
                if resp.cancel.cancelled:
                    break
                resp.clock.on_audio_ready()
                n = max(1, int(chunk.sample_rate * frame_s))
                for i in range(0, len(chunk.pcm), n):
                    if resp.cancel.cancelled:
                        return
                    text = chunk.text if i == 0 else ""
                    await self.push(
                        OutputAudio(to_int16(chunk.pcm[i : i + n]), chunk.sample_rate, text)
                    )
        except Exception as exc:
            log.exception("TTS failed")
            if not resp.cancel.cancelled:
                await self.push(ErrorFrame("tts_error", f"speech synthesis failed: {exc}"))
        if not resp.cancel.cancelled:
            await self.push(AnswerText("", end=True))


class Output(Stage):
    """Holds a speculative answer's audio until it is released, paces audio in real time
    when asked, tracks what the user really heard, and hands frames to the transport."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self._play: asyncio.Queue[Frame] = asyncio.Queue()
        self._player: asyncio.Task[None] | None = None

    async def process(self, frame: Frame) -> None:
        s = self.session
        resp = s.response
        if isinstance(frame, InputAudio):
            return  # the user's own audio goes no further than the pipeline
        if isinstance(frame, OutputAudio) and resp is None:
            return  # audio of an answer that was cancelled meanwhile
        if isinstance(frame, (OutputAudio, AnswerText)) and resp is not None:
            if isinstance(frame, AnswerText) and not frame.end and resp.released.is_set():
                await self.push(frame)
                return
            if not resp.released.is_set():
                resp.held.append(frame)
                return
            await self._out(frame)
            return
        await self.push(frame)

    async def release(self, resp: Response) -> None:
        held, resp.held = resp.held, []
        for frame in held:
            if isinstance(frame, AnswerText) and not frame.end:
                await self.push(frame)
            else:
                await self._out(frame)

    async def _out(self, frame: Frame) -> None:
        if self.session.pace_output:
            if self._player is None or self._player.done():
                self._player = self.session.spawn(self._play_loop())
            self._play.put_nowait(frame)
        else:
            await self._emit(frame)

    async def _emit(self, frame: Frame) -> None:
        s = self.session
        resp = s.response
        if resp is None or resp.cancel.cancelled:
            return
        if isinstance(frame, OutputAudio):
            resp.on_played(frame, self.session.pace_output)
            await self.push(frame)
        elif isinstance(frame, AnswerText) and frame.end:
            await s.finish_response(resp, interrupted=False)

    async def _play_loop(self) -> None:
        """Emit audio frames at real-time pace (a barge-in then stops within one frame)."""
        next_at: float | None = None
        while True:
            frame = await self._play.get()
            if isinstance(frame, OutputAudio):
                now = time.monotonic()
                if next_at is None or now > next_at + 0.1:
                    next_at = now  # first frame, or the producer starved us: restart the clock
                elif next_at > now:
                    await asyncio.sleep(next_at - now)
                next_at += len(frame.pcm) / frame.sample_rate
            await self._emit(frame)

    def flush(self) -> None:
        """Drop queued audio at once (barge-in)."""
        while not self._play.empty():
            self._play.get_nowait()
