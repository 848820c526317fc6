"""One conversation: its options and its pipeline.

Transports (WebRTC, WebSocket APIs, telephony, microphone, files) push audio in with
``push_audio`` and read frames out of ``frames()``; everything in between is the pipeline:

    TurnDetector -> ListenerStage -> TurnController -> Responder -> Speaker -> Output -> frames()

The client's requests (respond, cancel, commit, clear, truncate) go to the turn controller,
which owns the state of the turn. The session itself holds no turn state.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from realtime.asr import WhisperRecognizer
from realtime.audio import PIPELINE_RATE, AudioFormatError, InputConverter
from realtime.config import AgentConfig
from realtime.context import SessionContext, SessionOptions, Tasks
from realtime.controller import HistoryEntry, Phase, TurnController
from realtime.engine.base import Engine
from realtime.engine.tools import ToolResult
from realtime.engine.worker import EngineWorker
from realtime.frames import Dtmf, EndFrame, ErrorFrame, Frame, InputAudio, OutputAudio, ToolOutput
from realtime.listener import Listener
from realtime.log_context import bind_session
from realtime.stages import (
    EngineLink,
    ListenerStage,
    Output,
    Responder,
    Speaker,
    Stage,
    TurnDetector,
)
from realtime.turn import Response
from tts.base import TTSHead

__all__ = ["HistoryEntry", "Phase", "Session", "SessionOptions", "SharedModels"]

log = logging.getLogger(__name__)

MAX_CHUNK_S = 10.0  # one push_audio call may carry at most this much audio
MAX_ITEM_AUDIO_S = 28.0  # a clip transcribed whole fits one Whisper window (with its padding)
DTMF_KEYS = frozenset("0123456789*#ABCD")


@dataclass(eq=False)
class SharedModels:
    """What every session uses and no session owns (the ``Runtime`` loads them)."""

    config: AgentConfig
    asr: WhisperRecognizer | None
    asr_executor: Any  # concurrent.futures.Executor: the recognition thread
    engine: Engine
    worker: EngineWorker  # the engine's thread
    tts: TTSHead


class _Outbox:
    """Frames on their way to the transport, and the seconds of audio among them: what a
    client that stops reading leaves unsent (the server drops it past a limit)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.audio_s = 0.0

    def put(self, frame: Frame) -> None:
        if isinstance(frame, OutputAudio):
            self.audio_s += len(frame.pcm) / frame.sample_rate
        self._queue.put_nowait(frame)

    async def get(self) -> Frame:
        return self._taken(await self._queue.get())

    def get_nowait(self) -> Frame:
        return self._taken(self._queue.get_nowait())

    def empty(self) -> bool:
        return self._queue.empty()

    def _taken(self, frame: Frame) -> Frame:
        if isinstance(frame, OutputAudio):
            self.audio_s = max(0.0, self.audio_s - len(frame.pcm) / frame.sample_rate)
        return frame


class _Sink(Stage):
    """The end of the pipeline: frames go to the transport's outbox."""

    def __init__(self, out: _Outbox) -> None:
        super().__init__()
        self.out = out

    async def process(self, frame: Frame) -> None:
        self.out.put(frame)


class Session:
    def __init__(
        self,
        models: SharedModels,
        options: SessionOptions | None = None,
        pace_output: bool = True,
        session_id: str | None = None,
    ) -> None:
        self.models = models
        self.id = session_id or f"sess_{uuid.uuid4().hex[:16]}"
        cfg = models.config
        options = options or SessionOptions(vad=copy.deepcopy(cfg.vad))
        self._out = _Outbox()
        self.ctx = SessionContext(options, cfg, pace_output, Tasks(self.id, self._task_failed))
        self.listener = Listener(models.asr, cfg.asr, models.asr_executor)
        engine = models.engine
        self.engine = EngineLink(
            models.worker,
            listens=engine.input_kind == "audio",
            interleaved=getattr(engine, "interleaved_responses", False),
        )
        self._converter: InputConverter | None = None
        self._t = 0.0  # stream time of the next input sample
        self._closing: asyncio.Future[None] | None = None  # set once close() has begun
        self._keys_timer: asyncio.Task[None] | None = None
        self.on_close: Callable[[Session], None] | None = None  # the runtime forgets it
        # the data path, top to bottom
        self.detector = TurnDetector(self.ctx)
        self.listener_stage = ListenerStage(self.ctx, self.listener)
        self.controller = TurnController(self.ctx, text_input=not self.engine.listens)
        self.responder = Responder(self.ctx, self.engine)
        self.speaker = Speaker(self.ctx, models.tts)
        self.output = Output(self.ctx)
        self.output.observer = self.controller
        self.listener.hint = self.controller.asr_hint  # backchannels while judging a barge-in
        stages: list[Stage] = [
            self.detector,
            self.listener_stage,
            self.controller,
            self.responder,
            self.speaker,
            self.output,
            _Sink(self._out),
        ]
        for a, b in itertools.pairwise(stages):
            a.next = b

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def _closed(self) -> bool:
        return self._closing is not None

    @property
    def options(self) -> SessionOptions:
        return self.ctx.options

    @property
    def pace_output(self) -> bool:
        return self.ctx.pace_output

    @property
    def system_prompt(self) -> str:
        return self.options.instructions or self.ctx.config.engine.system_prompt

    async def start(self) -> None:
        bind_session(self.id)  # the caller's log lines (and its tasks' from now on) name it
        engine, sampling = self.models.engine, self.ctx.config.engine.sampling
        if self.options.think_budget is not None:
            sampling = replace(sampling, think_budget=self.options.think_budget)
        prompt = self.system_prompt
        self.engine.session = await self.models.worker.call(
            lambda: engine.new_session(prompt, sampling)
        )
        if self.options.tools:
            self._submit_tools()

    async def close(self) -> None:
        """End the turn, the session's tasks and its engine session, then let the runtime forget
        it. The close runs to its end even when the caller is cancelled meanwhile (a handler cut
        by a server shutting down): cut halfway, it would keep its engine cache and its place
        in the runtime for good. Every call waits for that one close."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            await self.controller.close()
        except (Exception, asyncio.CancelledError):  # a stage that fails to stop its turn
            log.exception("session %s: stopping its turn failed; closing the rest", self.id)
        self.ctx.tasks.cancel_all()
        es, self.engine.session = self.engine.session, None
        try:
            if es is not None:
                await self.models.worker.call(es.close)
        finally:
            if self.on_close is not None:
                self.on_close(self)

    async def frames(self) -> AsyncIterator[Frame]:
        """Everything the session says, in order; ends after the EndFrame."""
        while True:
            frame = await self._out.get()
            yield frame
            if isinstance(frame, EndFrame):
                return

    @property
    def output_backlog_s(self) -> float:
        """Seconds of answer audio made and not yet taken by the transport."""
        return self._out.audio_s

    def _task_failed(self, exc: BaseException) -> None:
        err = ErrorFrame("internal_error", f"{type(exc).__name__}: {exc}")
        asyncio.get_running_loop().create_task(self.output.process(err))

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
        asr = self.models.asr
        if asr is None:
            raise ValueError(
                "this configuration has no speech recognition (the model hears streamed audio "
                "itself): stream the audio with input_audio_buffer.append instead"
            )
        mono = InputConverter(sample_rate)(pcm, last=True)
        if len(mono) > MAX_ITEM_AUDIO_S * PIPELINE_RATE:
            raise AudioFormatError(f"an audio item may hold at most {MAX_ITEM_AUDIO_S:.0f} s")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.models.asr_executor, asr.transcribe, mono)

    async def commit(self) -> None:
        """End the user's turn now (manual turn detection)."""
        await self.detector.force_stop()

    async def clear(self) -> None:
        self.listener.reset()
        self.detector.reset()
        await self.controller.discard()

    async def end(self) -> None:
        """The input is over: finish the turn in flight, then end the frame stream."""
        if self._keys_timer is not None:  # keys pressed last are not answered any more
            self._keys_timer.cancel()
        await self.detector.force_stop()
        await self.controller.wait_idle()
        await self.detector.process(EndFrame("input ended"))

    async def wait_idle(self) -> None:
        await self.controller.wait_idle()

    @property
    def busy(self) -> bool:
        return self.controller.busy

    # -- the turn (read by transports and tests) -----------------------------------------
    @property
    def response(self) -> Response | None:
        return self.controller.response

    @property
    def history(self) -> list[HistoryEntry]:
        return self.controller.history

    @property
    def turns(self) -> int:
        return self.controller.turns

    # -- control (Realtime API and friends) ----------------------------------------------
    def update(self, **changes: Any) -> None:
        names = {f.name for f in fields(SessionOptions)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown session option {unknown[0]!r}")
        vad = changes.pop("vad", None)
        if isinstance(vad, dict):
            vad = replace(self.options.vad, **vad)
        self.ctx.options = replace(self.options, **changes, **({"vad": vad} if vad else {}))
        if vad is not None or "turn_detection" in changes:
            self.detector.reconfigure()
        es, prompt = self.engine.session, self.system_prompt
        if "instructions" in changes and es is not None:  # queued: never waits on the engine
            self.models.worker.submit(lambda: es.set_instructions(prompt))
        if ("tools" in changes or "tool_choice" in changes) and es is not None:
            self._submit_tools()

    def _submit_tools(self) -> None:
        """Queue the declared tools on the engine's thread (never awaited here)."""
        es, opts = self.engine.session, self.options
        if es is None:
            return
        tools, choice = tuple(opts.tools), opts.tool_choice
        fut = self.models.worker.submit(lambda: es.set_tools(tools, choice))

        def done(f: Any) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("the engine refused the tools", exc_info=f.exception())

        fut.add_done_callback(done)

    def add_tool_result(self, call_id: str, name: str, output: str) -> None:
        """The client ran a tool the model called: its output goes to the engine with the next
        answer (``respond()``), in the model's tool-result role."""
        self.controller.add_tool_result(ToolResult(call_id, name, output))
        self._out.put(ToolOutput(call_id, name, output))  # for the user to see

    def add_message(self, role: str, text: str) -> None:
        if role == "user":
            self.controller.add_user_text(text)
        elif role == "system":
            self.update(instructions=f"{self.system_prompt}\n{text}")
        elif role == "assistant":
            self.history.append(HistoryEntry("", text, text, False))
        else:
            raise ValueError(f"unknown role {role!r}; expected user, assistant or system")

    def truncate(self, audio_end_ms: int, response_id: int | None = None) -> str:
        """The client played only ``audio_end_ms`` of an answer (default: the last): the
        history and the engine's keep the words heard, which are returned. KeyError for an
        unknown ``response_id``."""
        return self.controller.truncate(audio_end_ms, response_id)

    def forget(self, response_id: int, user: bool = False, answer: bool = False) -> None:
        """Delete a turn's user part and/or answer from the history and the engine's.
        KeyError for an unknown ``response_id``."""
        self.controller.forget(response_id, user, answer)

    async def press_key(self, digit: str) -> None:
        """A key the caller pressed (telephony DTMF). It goes out as a ``Dtmf`` frame and, with
        ``telephony.dtmf_to_engine``, into the conversation as user text ("[keypad: 1]") that
        the engine reads with the caller's next words, or alone once no words came for
        ``telephony.dtmf_respond_after_s``. The key itself is never logged (it may be a PIN)."""
        if not isinstance(digit, str) or digit not in DTMF_KEYS:
            raise ValueError(f"a keypad key is one of 0-9, *, #, A-D; got {digit!r}")
        if self._closed:
            raise RuntimeError("the session is closed")
        log.info("session %s: keypad key pressed", self.id)
        await self.output.process(Dtmf(digit))
        tel = self.ctx.config.telephony
        if not tel.dtmf_to_engine:
            return
        self.controller.add_user_text(f"[keypad: {digit}]")
        if tel.dtmf_respond_after_s > 0:
            if self._keys_timer is not None:
                self._keys_timer.cancel()
            self._keys_timer = self.ctx.spawn(self._answer_keys(tel.dtmf_respond_after_s))

    async def _answer_keys(self, after_s: float) -> None:
        """No more keys and no words for ``after_s``: answer the keys pressed."""
        while True:
            await self.controller.wait_idle()
            await asyncio.sleep(after_s)
            if not self.controller.busy and not self.detector.endpointer.in_speech:
                break
        if self.controller.pending_text is not None:  # (None: the caller's words took them)
            await self.respond()

    async def respond(self, text: str | None = None) -> None:
        """Start a response: to ``text``, to pending user messages, or to the last turn."""
        await self.controller.respond(text)

    async def cancel(self) -> None:
        await self.controller.interrupt()
