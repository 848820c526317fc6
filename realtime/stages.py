"""The stages of a session, in data-path order:

    TurnDetector -> ListenerStage -> (TurnController) -> Responder -> Speaker -> Output -> sink

Each stage transforms the frames it cares about and pushes frames downstream; none calls back
into another stage or the session. The turn controller (``realtime.controller``) decides what
to answer and when; it steers the stages below it with control frames. The output stage, the
last one, reports what really went out to an observer (the controller). Long work
(recognition, decoding, synthesis) runs in tasks that push frames when results arrive; its
blocking parts run on threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from realtime.audio import PIPELINE_RATE, to_int16
from realtime.context import SessionContext
from realtime.engine.base import EngineSession
from realtime.engine.worker import EngineWorker
from realtime.frames import (
    AnswerText,
    CancelResponse,
    CommitTurn,
    DiscardTurn,
    ErrorFrame,
    Frame,
    InputAudio,
    OutputAudio,
    ReleaseResponse,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    StartResponse,
    ThinkingText,
    ToolCall,
    Transcript,
    TurnAudio,
)
from realtime.listener import Listener
from realtime.vad import Endpointer
from tts.base import TTSHead, TTSStream

log = logging.getLogger(__name__)

# frames that steer the stages and never reach the transport
CONTROL_FRAMES = (StartResponse, ReleaseResponse, CancelResponse, CommitTurn, DiscardTurn)


class Stage:
    def __init__(self) -> None:
        self.next: Stage | None = None

    async def process(self, frame: Frame) -> None:
        await self.push(frame)

    async def push(self, frame: Frame) -> None:
        if self.next is not None:
            await self.next.process(frame)


class TurnDetector(Stage):
    """VAD endpointing; also maps stream time to the wall time audio arrived."""

    def __init__(self, ctx: SessionContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.endpointer = self._endpointer()
        self._arrivals: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=500
        )
        self._unstopped = False  # manual turns: audio came since the last stop

    def _endpointer(self) -> Endpointer:
        return Endpointer(self.ctx.options.vad, self.ctx.config.asr.speculative_after_ms)

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
        if self.ctx.options.turn_detection:
            for ev in self.endpointer.force_stop():
                await self._emit(ev.kind, ev.t, ev.t_decided)
        elif self._unstopped:
            self._unstopped = False
            t = self.endpointer.now
            await self.push(SpeechStopped(t, t, time.monotonic(), time.monotonic()))

    def reset(self) -> None:
        self.endpointer.reset()
        self._unstopped = False


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
        text = await self.listener.maybe_partial()
        if text:
            await self.push(Transcript(text, final=False))

    async def _candidate(self) -> None:
        text = await self.listener.candidate()
        if text is not None:
            await self.push(Transcript(text, final=False, candidate=True))

    async def _final(self) -> None:
        text = await self.listener.finish()
        await self.push(Transcript(text, final=True))


@dataclass
class EngineLink:
    """The session's handle on the reply engine: the worker thread that runs it and the
    engine's per-session state (made on that thread when the session starts)."""

    worker: EngineWorker
    listens: bool  # the engine hears audio (pre-fills it while the user speaks)
    interleaved: bool  # its sessions' answers may advance step by step in turn
    session: EngineSession | None = None


class Responder(Stage):
    """Runs the engine: feeds it the turn's audio (audio engines), streams the answers the
    controller starts, and records finished turns. Engine calls are queued on the engine's
    worker thread and never awaited on the input path."""

    def __init__(self, ctx: SessionContext, engine: EngineLink) -> None:
        super().__init__()
        self.ctx = ctx
        self.engine = engine

    async def process(self, frame: Frame) -> None:
        es = self.engine.session
        if isinstance(frame, TurnAudio):
            if self.engine.listens and es is not None:
                self._submit(lambda: es.listen(frame.pcm))
            return
        if isinstance(frame, DiscardTurn):
            if self.engine.listens and es is not None:
                self._submit(es.discard)
            return
        if isinstance(frame, CommitTurn):
            if es is not None:
                self._submit(lambda: es.commit(frame.turn, frame.spoken, frame.interrupted))
            return
        await self.push(frame)
        if isinstance(frame, StartResponse):
            self.ctx.spawn(self._run(frame))

    def _submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` on the engine thread (in order with every other engine job); a
        failure is reported as an error frame, never raised into the input path."""
        fut = self.engine.worker.submit(job)
        loop = asyncio.get_running_loop()

        def done(f: object) -> None:
            exc = fut.exception() if not fut.cancelled() else None
            if exc is not None:
                log.error("engine job failed", exc_info=exc)
                err = ErrorFrame("engine_error", f"the reply engine failed: {exc}")
                loop.call_soon_threadsafe(lambda: self.ctx.spawn(self.push(err)))

        fut.add_done_callback(done)

    async def _run(self, start: StartResponse) -> None:
        """Stream the engine's tokens for one answer as frames."""
        es, rid, cancel = self.engine.session, start.response_id, start.cancel
        assert es is not None, "the session was not started"
        try:
            stream = self.engine.worker.stream(
                lambda: es.respond(start.turn, cancel), exclusive=not self.engine.interleaved
            )
            async for ev in stream:
                if cancel.cancelled:
                    continue  # drain: the worker stops within one step
                if ev.kind == "answer":
                    await self.push(AnswerText(rid, ev.text))
                elif ev.kind == "thinking":
                    await self.push(ThinkingText(rid, ev.text))
                elif ev.kind == "tool_call":
                    await self.push(ToolCall(rid, ev.text))
        except Exception as exc:
            log.exception("engine failed")
            if not cancel.cancelled:
                msg = f"the reply engine failed: {exc}"
                await self.push(ErrorFrame("engine_error", msg, response_id=rid))
        if not cancel.cancelled:
            st = es.stats
            usage = {
                "input_tokens": st.prefill_tokens,
                "output_tokens": st.generated_tokens,
                "reasoning_tokens": st.thinking_tokens,
            }
            await self.push(AnswerText(rid, "", end=True, usage=usage))


class Speaker(Stage):
    """Streams answer text into the TTS head and its audio on in output-sized frames. A
    text-only session (``speak=False``) passes the text on untouched."""

    def __init__(self, ctx: SessionContext, tts: TTSHead) -> None:
        super().__init__()
        self.ctx = ctx
        self.tts = tts
        self._streams: dict[int, TTSStream] = {}
        self._ends: dict[int, AnswerText] = {}  # answers' end frames, sent after their audio

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, CancelResponse):
            stream = self._streams.pop(frame.response_id, None)
            if stream is not None:
                stream.cancel()
        elif isinstance(frame, AnswerText) and self.ctx.options.speak:
            stream = self._streams.get(frame.response_id)
            if stream is None:
                opts = self.ctx.options
                stream = self.tts.open_stream(
                    opts.voice, opts.speaking_rate, output_rate=opts.output_sample_rate
                )  # resampled to the transport's rate on the TTS thread
                self._streams[frame.response_id] = stream
                self.ctx.spawn(self._pump(frame.response_id, stream))
            if frame.end:
                stream.finish()
                self._ends[frame.response_id] = frame
                return  # re-sent by _pump after the last audio
            stream.push_text(frame.text)
        await self.push(frame)

    async def _pump(self, rid: int, stream: TTSStream) -> None:
        frame_s = self.ctx.config.audio.output_frame_ms / 1000
        try:
            async for chunk in stream.chunks():
                if stream.cancelled:
                    return
                n = max(1, int(chunk.sample_rate * frame_s))
                for i in range(0, len(chunk.pcm), n):
                    if stream.cancelled:
                        return
                    text = chunk.text if i == 0 else ""
                    pcm = to_int16(chunk.pcm[i : i + n])
                    await self.push(OutputAudio(rid, pcm, chunk.sample_rate, text))
        except Exception as exc:
            log.exception("TTS failed")
            if not stream.cancelled:
                msg = f"speech synthesis failed: {exc}"
                await self.push(ErrorFrame("tts_error", msg, response_id=rid))
        finally:
            self._streams.pop(rid, None)
        end = self._ends.pop(rid, None)
        if not stream.cancelled:
            await self.push(end or AnswerText(rid, "", end=True))


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
        elif (rid := _response_id(frame)) is not None:
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
        rid = _response_id(frame)
        if rid not in self._answers:
            return  # cancelled while queued
        if isinstance(frame, OutputAudio):
            self._observe(frame, played=True)
            await self.push(frame)
        elif isinstance(frame, AnswerText) and frame.end:
            del self._answers[rid]
            self._observe(frame, played=True)

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


def _response_id(frame: Frame) -> int | None:
    if isinstance(frame, (AnswerText, ThinkingText, ToolCall, OutputAudio)):
        return frame.response_id
    if isinstance(frame, ErrorFrame):
        return frame.response_id
    return None
