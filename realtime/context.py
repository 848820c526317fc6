"""What every stage of one session shares: the session's options, the agent's config, whether
output is paced, and the set of tasks the session owns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from realtime.config import AgentConfig, VADConfig
from realtime.engine.tools import ToolChoice, ToolSpec

log = logging.getLogger(__name__)


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
    # paced output may run this far ahead of real time: a listener that buffers a little (a
    # phone call: telephony.playout_lead_ms); what it holds is what a barge-in must clear
    output_lead_s: float = 0.0
    think_budget: int | None = None  # reasoning tokens before speaking; None = the config's
    tools: tuple[ToolSpec, ...] = ()  # functions the model may call (session.update tools)
    tool_choice: ToolChoice = "auto"  # auto | none | required | one tool's name


class Tasks:
    """The session's background tasks: cancelled together at close; a task that fails is
    logged and reported through ``on_error`` (the session turns it into an error frame)."""

    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self.name = name
        self.on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            log.error("session %s task failed", self.name, exc_info=exc)
            self.on_error(exc)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)


@dataclass
class SessionContext:
    options: SessionOptions
    config: AgentConfig
    pace_output: bool  # output is handed out in real time (a live listener), not all at once
    tasks: Tasks

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.tasks.spawn(coro)
