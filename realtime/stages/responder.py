"""The engine's stage: the turn's audio, answers and finished turns, queued on the engine's
thread and never awaited on the input path."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from realtime.context import SessionContext
from realtime.engine.base import EngineSession
from realtime.engine.tools import NONE, ToolCallError, argument_errors, parse_tool_calls
from realtime.engine.worker import EngineWorker
from realtime.frames import (
    AnswerText,
    CommitTurn,
    DiscardTurn,
    ErrorFrame,
    Frame,
    ReviseTurn,
    StartResponse,
    ThinkingText,
    ToolCall,
    TurnAudio,
)
from realtime.stages.base import Stage

log = logging.getLogger(__name__)


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
        # The audio a queued listen job will hear: frames that come before it runs join it, so
        # a busy engine gets one job per session instead of one per 20 ms frame. Any other job
        # seals it (later audio goes to a new job, after that one). Guarded by ``_heard_lock``:
        # the job takes it on the engine thread.
        self._heard: list[np.ndarray] | None = None
        self._heard_lock = threading.Lock()

    def _listen(self, es: EngineSession, pcm: np.ndarray) -> None:
        with self._heard_lock:
            if self._heard is not None:
                self._heard.append(pcm)
                return
            heard = self._heard = [pcm]

        def job() -> None:
            with self._heard_lock:
                if self._heard is heard:
                    self._heard = None
                pieces = list(heard)
            es.listen(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))

        self._submit(job, audio=True)

    async def process(self, frame: Frame) -> None:
        es = self.engine.session
        if isinstance(frame, TurnAudio):
            if self.engine.listens and es is not None:
                self._listen(es, frame.pcm)
            return
        if isinstance(frame, DiscardTurn):
            if self.engine.listens and es is not None:
                self._submit(es.discard)
            return
        if isinstance(frame, CommitTurn):
            if es is not None:
                self._submit(lambda: es.commit(frame.turn, frame.spoken, frame.interrupted))
            return
        if isinstance(frame, ReviseTurn):
            if es is not None:
                self._submit(
                    lambda: es.revise(
                        frame.turn, frame.answer, frame.forget_user, frame.forget_answer
                    )
                )
            return
        await self.push(frame)
        if isinstance(frame, StartResponse):
            self._seal()  # the answer's stream is queued after the audio heard so far
            self.ctx.spawn(self._run(frame))

    def _seal(self) -> None:
        """Audio from now on is heard after the job about to be queued."""
        with self._heard_lock:
            self._heard = None

    def _submit(self, job: Callable[[], None], audio: bool = False) -> None:
        """Queue ``job`` on the engine thread (in order with every other engine job); a
        failure is reported as an error frame, never raised into the input path."""
        if not audio:
            self._seal()
        fut = self.engine.worker.submit(job)
        loop = asyncio.get_running_loop()

        def done(f: object) -> None:
            exc = fut.exception() if not fut.cancelled() else None
            if exc is not None:
                log.error("engine job failed", exc_info=exc)
                err = ErrorFrame("engine_error", f"the reply engine failed: {exc}")
                loop.call_soon_threadsafe(lambda: self.ctx.spawn(self.push(err)))

        fut.add_done_callback(done)

    def _tool_calls(self, rid: int, payload: str) -> list[ToolCall | ErrorFrame]:
        """The model's calls as ``ToolCall`` frames with fresh call ids, or an error (not an
        answer error: the answer goes on) for what is not a call to a declared tool."""
        opts = self.ctx.options
        try:
            calls = parse_tool_calls(payload)
        except ToolCallError as exc:
            return [ErrorFrame("invalid_tool_call", f"the model's tool call is unreadable: {exc}")]
        out: list[ToolCall | ErrorFrame] = []
        for call in calls:
            spec = next((t for t in opts.tools if t.name == call.name), None)
            if spec is None or opts.tool_choice == NONE:
                declared = [t.name for t in opts.tools]
                msg = f"the model called {call.name!r}, " + (
                    "but tool_choice is 'none'"
                    if opts.tool_choice == NONE
                    else f"which is not a declared tool {declared}"
                )
                out.append(ErrorFrame("invalid_tool_call", msg))
                continue
            problems = argument_errors(spec, call.arguments)
            if problems:  # passed on as written (the client decides), but logged
                log.info("tool call %s: arguments do not fit the schema: %s", call.name, problems)
            call_id = f"call_{uuid.uuid4().hex[:22]}"
            out.append(ToolCall(rid, call_id, call.name, call.arguments, payload))
        return out

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
                    for frame in self._tool_calls(rid, ev.text):
                        await self.push(frame)
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
