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
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# Bytes a socket's writer buffers before it waits for the client to read: small, so that what a
# stalled client leaves unsent shows as the session's output backlog (aiohttp's default is 64 kB
# in the writer and 64 kB more in the transport, seconds of phone audio).
WRITE_BUFFER_BYTES = 16 * 1024
OUTPUT_CHECK_S = 0.1  # how often the unsent output of a connection is looked at
OUTPUT_GRACE_S = 1.0  # how long it may stay over the limit (a burst of speech drains faster)
CLOSE_TIMEOUT_S = 1.0  # a closing handshake longer than this is cut (the peer is gone)
NOTIFY_TIMEOUT_S = 0.2  # an error event for a dropped client, if its socket still takes it


class OutputQueueFull(Exception):
    """The client stopped reading: more unsent answer audio than ``max_output_queue_s``."""


async def _watch_output(ctx: ServerContext, session: AgentSession) -> None:
    """Raise ``OutputQueueFull`` once ``session`` has held more unsent audio than the limit
    for ``OUTPUT_GRACE_S`` on end."""
    limit = ctx.config.max_output_queue_s
    loop = asyncio.get_running_loop()
    over_since: float | None = None
    while True:
        await asyncio.sleep(OUTPUT_CHECK_S)
        backlog = getattr(session, "output_backlog_s", 0.0)
        if backlog <= limit:
            over_since = None
            continue
        now = loop.time()
        over_since = now if over_since is None else over_since
        if now - over_since >= OUTPUT_GRACE_S:
            raise OutputQueueFull(
                f"the client is not reading: {backlog:.1f} s of audio wait unsent (the limit is "
                f"{limit:g} s); closing the connection"
            )


def bound_write_buffer(request: Any) -> None:
    """Keep at most ``WRITE_BUFFER_BYTES`` in ``request``'s transport before writes wait."""
    conn = getattr(request, "transport", None)
    if conn is not None:
        conn.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)


async def run_connection(
    ctx: ServerContext,
    transport: str,
    session: AgentSession,
    ws: Any,
    pump: Awaitable[None],
    read: Awaitable[None],
    request: Any = None,
    notify: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Drive one WebSocket connection: ``pump`` (session -> client) runs beside ``read``
    (client -> session) until the read side ends, or the client stops reading and its unsent
    output passes ``max_output_queue_s`` (then it is told with ``notify`` if its socket still
    takes a message, and dropped). However it ended, the pump stops, the session closes and the
    socket is closed, or cut (``request``'s transport aborted) when the peer does not answer."""
    pump_task = asyncio.ensure_future(pump)
    read_task = asyncio.ensure_future(read)
    watch_task = asyncio.ensure_future(_watch_output(ctx, session))
    dropped: OutputQueueFull | None = None
    try:
        await asyncio.wait({read_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        if watch_task.done() and not watch_task.cancelled():
            exc = watch_task.exception()
            if isinstance(exc, OutputQueueFull):
                dropped = exc
    finally:
        await cancel_task(watch_task)
        await cancel_task(read_task)
        await cancel_task(pump_task)
        if dropped is not None:
            sid = getattr(session, "id", "?")
            log.warning("%s session %s dropped: %s", transport, sid, dropped)
            ctx.metrics.client_errors.labels(transport, "output_queue_full").inc()
            if notify is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(notify(str(dropped)), NOTIFY_TIMEOUT_S)
        await ctx.close_session(transport, session)
        await _close_socket(ws, request, cut=dropped is not None)
    if read_task.done() and not read_task.cancelled():
        exc = read_task.exception()
        if exc is not None and not isinstance(exc, ConnectionResetError):
            raise exc


async def _close_socket(ws: Any, request: Any, cut: bool) -> None:
    """Close ``ws`` with a handshake, or cut its transport: at once when ``cut``, else when
    the handshake takes longer than ``CLOSE_TIMEOUT_S`` (a peer that vanished or stalled)."""
    if not cut:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
            return
    conn = getattr(request, "transport", None)
    if conn is not None:
        conn.abort()
