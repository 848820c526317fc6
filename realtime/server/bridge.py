"""What every transport shares: the pipeline contract it drives, session slots under
``max_sessions``, and the server-wide context handed to each handler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from realtime.config import ServerConfig
from realtime.engine.base import EngineBusy
from realtime.frames import Frame
from realtime.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"


class AgentSession(Protocol):
    """The part of ``realtime.session.Session`` the transports use."""

    async def start(self) -> None: ...
    async def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None: ...
    async def transcribe(self, pcm: np.ndarray, sample_rate: int) -> str: ...
    async def commit(self) -> None: ...
    async def clear(self) -> None: ...
    async def respond(self, text: str | None = None) -> None: ...
    async def cancel(self) -> None: ...
    def update(self, **changes: Any) -> None: ...
    def add_message(self, role: str, text: str) -> None: ...
    def truncate(self, audio_end_ms: int) -> None: ...
    async def end(self) -> None: ...
    async def close(self) -> None: ...
    def frames(self) -> AsyncIterator[Frame]: ...


class AgentRuntime(Protocol):
    def new_session(self, options: Any = None, pace_output: bool = True) -> AgentSession: ...


class CapacityError(RuntimeError):
    """``max_sessions`` sessions are open already, or the engine has no room for another."""


@dataclass
class ServerContext:
    runtime: AgentRuntime
    config: ServerConfig
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    web_dir: Path = WEB_DIR
    active: int = 0
    closers: set[Callable[[], Awaitable[None]]] = field(default_factory=set)

    async def open_session(
        self, transport: str, *, pace_output: bool, **changes: Any
    ) -> AgentSession:
        """A started session with ``changes`` applied, counted against ``max_sessions``.

        Raises ``CapacityError`` when full; pair every success with ``close_session``.
        """
        if self.active >= self.config.max_sessions:
            self.metrics.sessions_rejected.inc()
            raise CapacityError(
                f"the server is full ({self.config.max_sessions} sessions); try again later"
            )
        self.active += 1
        session: AgentSession | None = None
        try:
            session = self.runtime.new_session(None, pace_output=pace_output)
            if changes:
                session.update(**changes)
            await session.start()
        except BaseException as exc:
            self.active -= 1
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()
            if isinstance(exc, EngineBusy):  # the engine's cache is full: busy, like max_sessions
                self.metrics.sessions_rejected.inc()
                log.warning("%s session refused: %s", transport, exc)
                raise CapacityError(f"the agent is busy: {exc}") from None
            raise
        self.metrics.sessions_active.labels(transport).inc()
        self.metrics.sessions_total.labels(transport).inc()
        return session

    async def close_session(self, transport: str, session: AgentSession) -> None:
        self.active -= 1
        self.metrics.sessions_active.labels(transport).dec()
        try:
            await session.close()
        except Exception:  # a failing close must not take the server down
            log.exception("closing a %s session failed", transport)


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()  # retrieved: a pump that died with its socket is no news
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def run_connection(
    ctx: ServerContext,
    transport: str,
    session: AgentSession,
    ws: Any,
    pump: Awaitable[None],
    read: Awaitable[None],
) -> None:
    """Drive one WebSocket connection: ``pump`` (session -> client) runs beside ``read``
    (client -> session) until the read side ends; then, however it ended, the pump stops and
    the session and the socket are closed."""
    pump_task = asyncio.ensure_future(pump)
    try:
        await read
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        await cancel_task(pump_task)
        await ctx.close_session(transport, session)
        with contextlib.suppress(Exception):
            await ws.close()
