"""One conversation: its options, its pipeline of stages and the state of the turn in flight.

Transports (WebRTC, WebSocket APIs, telephony, microphone, files) push audio in with
``push_audio`` and read frames out of ``frames()``; everything in between is the pipeline.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from realtime.audio import PIPELINE_RATE, AudioFormatError, InputConverter
from realtime.config import VADConfig
from realtime.engine.base import EngineSession, UserTurn
from realtime.frames import EndFrame, ErrorFrame, Frame, InputAudio, Interruption, TurnMetrics
from realtime.listener import Listener
from realtime.stages import ListenerStage, Output, Responder, Speaker, Stage, TurnDetector
from realtime.turn import Response, TurnClock

if TYPE_CHECKING:
    from realtime.runtime import Runtime

log = logging.getLogger(__name__)

MAX_CHUNK_S = 10.0  # one push_audio call may carry at most this much audio
MAX_ITEM_AUDIO_S = 28.0  # a clip transcribed whole fits one Whisper window (with its padding)


@dataclass
class SessionOptions:
    instructions: str | None = None  # system prompt; None = the config's
    voice: str | None = None
    speaking_rate: float | None = None
    vad: VADConfig = field(default_factory=VADConfig)
    turn_detection: bool = True  # server VAD; False = the client commits turns
    create_response: bool = True  # answer automatically at the end of a turn
    interrupt_response: bool = True  # the user's speech cancels the answer (barge-in)
    output_sample_rate: int | None = None  # None = the TTS head's own rate
    speak: bool = True  # False: answers are text only (no TTS, no audio frames)


@dataclass
class HistoryEntry:
    user: str
    answer: str
    spoken: str
    interrupted: bool


class Session:
    def __init__(
        self,
        runtime: Runtime,
        options: SessionOptions | None = None,
        pace_output: bool = True,
        session_id: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.id = session_id or f"sess_{uuid.uuid4().hex[:16]}"
        self.options = options or SessionOptions(vad=copy.deepcopy(runtime.config.vad))
        self.pace_output = pace_output
        self.listener = Listener(runtime.asr, runtime.config.asr, runtime.asr_executor)
        self.engine_session: EngineSession = None  # type: ignore[assignment]  # set by start()
        self.engine_listens = runtime.engine.input_kind == "audio"
        self.clock = TurnClock()
        self.response: Response | None = None
        self._last_response: Response | None = None  # the last finished one (for truncate)
        self.history: list[HistoryEntry] = []
        self.last_turn_audio = np.zeros(0, np.float32)
        self.turns = 0
        self._ids = itertools.count(1)
        self._out: asyncio.Queue[Frame] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._converter: InputConverter | None = None
        self._t = 0.0  # stream time of the next input sample
        self._turn_open = False  # a turn ended and its answer is not finished yet
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending_text: str | None = None  # a committed turn awaiting response.create
        self._closed = False
        # the data path, top to bottom
        self.detector = TurnDetector(self)
        self.listener_stage = ListenerStage(self)
        self.responder = Responder(self)
        self.speaker = Speaker(self)
        self.output = Output(self)
        stages = [self.detector, self.listener_stage, self.responder, self.speaker, self.output]
        for a, b in itertools.pairwise(stages):
            a.next = b
        self.output.next = _Sink(self)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def system_prompt(self) -> str:
        return self.options.instructions or self.runtime.config.engine.system_prompt

    async def start(self) -> None:
        engine, sampling = self.runtime.engine, self.runtime.config.engine.sampling
        self.engine_session = await self.runtime.worker.call(
            lambda: engine.new_session(self.system_prompt, sampling)
        )
        self.runtime.sessions.add(self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.response is not None:
            self._cancel_response(self.response)
            self.response = None
        for task in list(self._tasks):
            task.cancel()
        if self.engine_session is not None:
            es = self.engine_session
            await self.runtime.worker.call(es.close)
        self.runtime.sessions.discard(self)

    async def frames(self) -> AsyncIterator[Frame]:
        """Everything the session says, in order; ends after the EndFrame."""
        while True:
            frame = await self._out.get()
            yield frame
            if isinstance(frame, EndFrame):
                return

    def emit(self, frame: Frame) -> None:
        self._out.put_nowait(frame)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("session %s task failed", self.id, exc_info=exc)
            self.emit(ErrorFrame("internal_error", f"{type(exc).__name__}: {exc}"))

    # -- input ----------------------------------------------------------------------------
    async def push_audio(
        self, pcm: np.ndarray, sample_rate: int, wall_arrival: float | None = None
    ) -> None:
        """User audio of any rate, int16 or float32, (n,) or (n, channels).

        ``wall_arrival``: when the chunk's last sample was captured (default: now). A paced
        file passes its schedule, so a late push never shortens the measured latency."""
        if self._closed:
            raise RuntimeError("the session is closed")
        if self._converter is None or self._converter.sample_rate != sample_rate:
            self._converter = InputConverter(sample_rate)
        if isinstance(pcm, np.ndarray) and len(pcm) > MAX_CHUNK_S * sample_rate:
            raise AudioFormatError(f"one audio chunk may hold at most {MAX_CHUNK_S:.0f} s")
        mono = self._converter(pcm)
        if mono.size == 0:
            return
        arrival = time.monotonic() if wall_arrival is None else wall_arrival
        frame = InputAudio(mono, self._t, arrival)
        self._t += len(mono) / PIPELINE_RATE
        await self.detector.process(frame)

    @property
    def stream_time(self) -> float:
        return self._t

    async def transcribe(self, pcm: np.ndarray, sample_rate: int) -> str:
        """Words in a whole clip sent outside the stream (a conversation item's audio),
        decoded on the recognition thread. The clip does not enter the turn in flight."""
        asr = self.runtime.asr
        if asr is None:
            raise ValueError(
                "this configuration has no speech recognition (the model hears streamed audio "
                "itself): stream the audio with input_audio_buffer.append instead"
            )
        mono = InputConverter(sample_rate)(pcm, last=True)
        if len(mono) > MAX_ITEM_AUDIO_S * PIPELINE_RATE:
            raise AudioFormatError(f"an audio item may hold at most {MAX_ITEM_AUDIO_S:.0f} s")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.runtime.asr_executor, asr.transcribe, mono)

    async def commit(self) -> None:
        """End the user's turn now (manual turn detection)."""
        await self.detector.force_stop()

    async def clear(self) -> None:
        self.listener.reset()
        self.detector.endpointer.reset()
        if self.engine_listens:
            self.runtime.worker.submit(self.engine_session.discard)

    async def end(self) -> None:
        """The input is over: finish the turn in flight, then end the frame stream."""
        await self.detector.force_stop()
        await self.wait_idle()
        self.emit(EndFrame("input ended"))

    async def wait_idle(self) -> None:
        """Until no turn is being transcribed or answered."""
        while True:
            await self._idle.wait()
            await asyncio.sleep(0)
            if self._idle.is_set():
                return

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    # -- control (Realtime API and friends) ----------------------------------------------
    def update(self, **changes: Any) -> None:
        names = {f.name for f in fields(SessionOptions)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown session option {unknown[0]!r}")
        vad = changes.pop("vad", None)
        if isinstance(vad, dict):
            vad = replace(self.options.vad, **vad)
        self.options = replace(self.options, **changes, **({"vad": vad} if vad else {}))
        if vad is not None or "turn_detection" in changes:
            self.detector.reconfigure()
        if "instructions" in changes and self.engine_session is not None:
            if hasattr(self.engine_session, "system_prompt"):
                self.engine_session.system_prompt = self.system_prompt  # type: ignore[attr-defined]

    def add_message(self, role: str, text: str) -> None:
        if role == "user":
            self._pending_text = (
                text if self._pending_text is None else f"{self._pending_text} {text}"
            )
        elif role == "system":
            self.update(instructions=f"{self.system_prompt}\n{text}")
        elif role == "assistant":
            self.history.append(HistoryEntry("", text, text, False))
        else:
            raise ValueError(f"unknown role {role!r}; expected user, assistant or system")

    def truncate(self, audio_end_ms: int) -> str:
        """The client played only ``audio_end_ms`` of the last answer; returns what was heard."""
        if not self.history:
            return ""
        last = self.history[-1]
        if self._last_response is not None:
            last.spoken = self._last_response.spoken_text(False, heard_s=audio_end_ms / 1000)
        return last.spoken

    async def respond(self, text: str | None = None) -> None:
        """Start a response: to ``text``, to pending user messages, or to the last turn."""
        if text is None:
            text, self._pending_text = self._pending_text, None
        if text is None:
            raise ValueError("nothing to respond to: no committed audio or user message")
        self.clock = TurnClock()
        self.clock.wall_speech_end = self.clock.wall_decided = time.monotonic()
        self.start_response(UserTurn(text=text), speculative=False)

    async def cancel(self) -> None:
        if self.response is not None:
            await self.interrupt()

    # -- turn logic (called by the stages) ------------------------------------------------
    def start_response(self, turn: UserTurn, speculative: bool) -> Response:
        self.drop_speculation()  # a newer speculative answer replaces an older one
        if self.engine_listens and turn.audio is None:
            turn.audio = self.last_turn_audio if not speculative else self.listener.turn_audio()
        resp = Response(next(self._ids), turn, self.clock, speculative)
        self.response = resp
        if not speculative:
            self._idle.clear()
            self._release_soon(resp)
        resp.task = self.spawn(self.responder.run(resp))
        return resp

    def _release_soon(self, resp: Response) -> None:
        resp.clock.wall_released = time.monotonic()
        resp.released.set()
        self.spawn(self.output.release(resp))

    def drop_speculation(self) -> None:
        resp = self.response
        if resp is not None and not resp.released.is_set():
            self._cancel_response(resp)
            self.response = None

    def open_turn(self) -> None:
        """The user's turn ended: busy until its answer is finished (or there is none)."""
        self._turn_open = True
        self._idle.clear()

    def _cancel_response(self, resp: Response) -> None:
        resp.cancel.cancel()
        if resp.tts is not None:
            resp.tts.cancel()
        self.output.flush()

    async def on_user_speech(self) -> None:
        """Speech started: a new turn; barge in on an answer being spoken."""
        self.clock = TurnClock()
        resp = self.response
        if resp is None:
            return
        if not resp.released.is_set():
            self.drop_speculation()
        elif self.options.interrupt_response:
            await self.interrupt()

    async def interrupt(self) -> None:
        resp = self.response
        if resp is None:
            return
        self._cancel_response(resp)
        spoken = self._delivered(resp, interrupted=True)
        self.emit(Interruption(spoken))
        await self.finish_response(resp, interrupted=True)

    async def on_final_transcript(self, text: str) -> None:
        self.open_turn()
        resp = self.response
        if not text.strip() and not self.engine_listens:
            self.drop_speculation()
            self.emit(ErrorFrame("no_speech", "no words were recognised in the speech"))
            self._close_turn()
            return
        if not self.options.create_response:
            self.drop_speculation()
            self._pending_text = text
            self._close_turn()
            return
        if resp is not None and resp.speculative and not resp.released.is_set():
            if resp.turn.text == text and not resp.failed:
                self._release_soon(resp)
                return
            self.drop_speculation()
        self.start_response(UserTurn(text=text), speculative=False)

    def _close_turn(self) -> None:
        self._turn_open = False
        if self.response is None or not self.response.released.is_set():
            self._idle.set()

    async def finish_response(self, resp: Response, interrupted: bool) -> None:
        if self.response is resp:
            self.response = None
        self._last_response = resp
        spoken = self._delivered(resp, interrupted)
        self.turns += 1
        self.history.append(HistoryEntry(resp.turn.text, resp.answer, spoken, interrupted))
        self.emit(self._metrics(resp, interrupted, spoken))
        es, turn = self.engine_session, resp.turn
        await self.runtime.worker.call(lambda: es.commit(turn, spoken, interrupted))
        self._close_turn()

    def _delivered(self, resp: Response, interrupted: bool) -> str:
        """What reached the user: the whole answer, unless speech was cut off (then the pieces
        they began to hear). A text-only answer was delivered as far as it was written."""
        if interrupted and self.options.speak:
            return resp.spoken_text(self.pace_output)
        return resp.answer.strip()

    def _metrics(self, resp: Response, interrupted: bool, spoken: str) -> TurnMetrics:
        tc, rc = resp.turn_clock, resp.clock
        end = tc.wall_speech_end

        def rel(t: float | None) -> float | None:
            return None if t is None or end is None else t - end

        first_packet = rel(rc.wall_first_audio)
        breakdown = {
            "endpoint_s": rel(tc.wall_decided),
            "transcript_s": rel(tc.wall_transcript),
            "response_start_s": rel(rc.wall_start),
            "first_token_s": rel(rc.wall_first_token),
            "first_answer_token_s": rel(rc.wall_first_answer_token),
            "first_audio_ready_s": rel(rc.wall_audio_ready),
            "released_s": rel(rc.wall_released),
            "first_audio_packet_s": first_packet,
            "speculative": 1.0 if resp.speculative else 0.0,
        }
        self.runtime.on_turn_metrics(first_packet)
        return TurnMetrics(
            turn=self.turns,
            first_packet_s=first_packet,
            breakdown=breakdown,
            interrupted=interrupted,
            transcript=resp.turn.text,
            answer=resp.answer.strip(),
            spoken=spoken,
        )


class _Sink(Stage):
    """The end of the pipeline: frames go to the transport's queue."""

    async def process(self, frame: Frame) -> None:
        self.session.emit(frame)
