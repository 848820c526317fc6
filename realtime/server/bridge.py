"""What every transport shares: the pipeline contract it drives, admission (``max_sessions``,
``max_sessions_per_key``, the engine's room, draining), the limits that watch each live session
(``max_session_s``, ``idle_timeout_s``), and the server-wide context handed to each handler."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
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
    def truncate(self, audio_end_ms: int, response_id: int | None = None) -> str: ...
    def forget(self, response_id: int, user: bool = False, answer: bool = False) -> None: ...
    async def press_key(self, digit: str) -> None: ...
    def add_tool_result(self, call_id: str, name: str, output: str) -> None: ...
    async def end(self) -> None: ...
    async def close(self) -> None: ...
    def frames(self) -> AsyncIterator[Frame]: ...


class AgentRuntime(Protocol):
    def new_session(self, options: Any = None, pace_output: bool = True) -> AgentSession: ...


REJECT_CODES = {
    "max_sessions": "session_limit_reached",
    "key_limit": "key_session_limit_reached",
    "engine_busy": "server_busy",
    "shutting_down": "server_shutting_down",
}


class CapacityError(RuntimeError):
    """A new session is refused: ``reason`` is ``max_sessions`` (the server is full),
    ``key_limit`` (this API key holds ``max_sessions_per_key`` already), ``engine_busy`` (the
    engine has no room: every cache slot is taken) or ``shutting_down`` (SIGTERM: draining)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def code(self) -> str:
        """The ``error`` event's code (Realtime, data channel, Twilio)."""
        return REJECT_CODES[self.reason]

    @property
    def status(self) -> int:
        """The HTTP status: 429 for one key's limit, 503 when the server itself has no room."""
        return 429 if self.reason == "key_limit" else 503

    def body(self) -> dict[str, Any]:
        """The JSON body of the HTTP answer."""
        kind = "rate_limit_error" if self.status == 429 else "server_error"
        return {"error": {"type": kind, "code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Notice:
    """Why the server ends a session: sent to the client (an ``error`` event with this code)
    before it closes. ``ws_code`` is the WebSocket close code."""

    code: str
    message: str
    ws_code: int = 1000


@dataclass(eq=False)
class LiveSession:
    """One open session as the server sees it, whatever its transport: the limits that watch
    it (``max_session_s``, ``idle_timeout_s``) and how it is ended (a notice, then a hang-up).

    A transport calls ``touch()`` on each input (message, audio packet) and ``attach(notify,
    hangup)`` once it can talk to its client: ``notify`` sends a ``Notice`` in the transport's
    own form, ``hangup`` closes the connection (the transport then closes the session with
    ``ServerContext.close_session``)."""

    ctx: ServerContext
    transport: str
    session: AgentSession
    key: str | None = None
    opened: float = field(default_factory=time.monotonic)
    last_input: float = field(default_factory=time.monotonic)
    notify: Callable[[Notice], Awaitable[None]] | None = None
    hangup: Callable[[Notice], Awaitable[None]] | None = None
    ending: Notice | None = None
    closed: bool = False
    _watch: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        """The session's id for logs (never what was said)."""
        return str(getattr(self.session, "id", f"sess_{id(self.session):x}"))

    def touch(self) -> None:
        self.last_input = time.monotonic()

    def attach(
        self,
        notify: Callable[[Notice], Awaitable[None]],
        hangup: Callable[[Notice], Awaitable[None]],
    ) -> None:
        self.notify, self.hangup = notify, hangup
        cfg = self.ctx.config
        if cfg.max_session_s > 0 or cfg.idle_timeout_s > 0:
            self._watch = asyncio.ensure_future(self._watchdog())

    async def end(self, notice: Notice, grace_s: float = 0.0) -> None:
        """Tell the client why, let the answer in flight finish (up to ``grace_s``), hang up."""
        if self.ending is not None or self.closed:
            return
        self.ending = notice
        log.info("%s session %s ending: %s", self.transport, self.id, notice.code)
        self.ctx.metrics.sessions_ended.labels(notice.code).inc()
        if self.notify is not None:
            try:
                await self.notify(notice)
            except Exception:  # the client may be gone already
                log.debug("%s session %s: the closing notice was not sent", self.transport, self.id)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and getattr(self.session, "busy", False):
            await asyncio.sleep(0.05)
        if self.hangup is not None:
            with contextlib.suppress(Exception):
                await self.hangup(notice)

    async def _watchdog(self) -> None:
        cfg = self.ctx.config
        while not self.closed:
            now = time.monotonic()
            due: list[tuple[float, Notice]] = []
            if cfg.max_session_s > 0:
                expired = Notice(
                    "session_expired",
                    f"the session reached its maximum duration of {cfg.max_session_s:g} s "
                    "(server.max_session_s); it is closed",
                )
                due.append((self.opened + cfg.max_session_s, expired))
            if cfg.idle_timeout_s > 0:
                if getattr(self.session, "busy", False):
                    self.last_input = max(self.last_input, now - cfg.idle_timeout_s / 2)
                idle = Notice(
                    "idle_timeout",
                    f"no input for {cfg.idle_timeout_s:g} s (server.idle_timeout_s); "
                    "the session is closed",
                )
                due.append((self.last_input + cfg.idle_timeout_s, idle))
            when, notice = min(due, key=lambda d: d[0])
            if when <= now:
                # a task of its own: ending closes the session, which cancels this watchdog
                self.ctx.spawn(self.end(notice))
                return
            await asyncio.sleep(when - now)


@dataclass
class ServerContext:
    runtime: AgentRuntime
    config: ServerConfig
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    web_dir: Path = WEB_DIR
    active: int = 0
    live: set[LiveSession] = field(default_factory=set)
    per_key: collections.Counter[str] = field(default_factory=collections.Counter)
    draining: bool = False
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _refuse(self, transport: str, reason: str, message: str) -> CapacityError:
        self.metrics.sessions_rejected.labels(reason).inc()
        log.warning("%s session refused (%s)", transport, reason)
        return CapacityError(reason, message)

    def admit(self, transport: str, key: str | None = None) -> None:
        """Raise ``CapacityError`` if a new session of ``key`` may not open now."""
        cfg = self.config
        if self.draining:
            raise self._refuse(
                transport, "shutting_down", "the server is shutting down; try another one"
            )
        if self.active >= cfg.max_sessions:
            raise self._refuse(
                transport,
                "max_sessions",
                f"the server is full ({cfg.max_sessions} sessions); try again later",
            )
        if key is not None and 0 < cfg.max_sessions_per_key <= self.per_key[key]:
            raise self._refuse(
                transport,
                "key_limit",
                f"this API key has {cfg.max_sessions_per_key} sessions open already "
                "(server.max_sessions_per_key); close one first",
            )

    async def open_session(
        self, transport: str, *, pace_output: bool, key: str | None = None, **changes: Any
    ) -> LiveSession:
        """A started session with ``changes`` applied, counted against ``max_sessions`` (and
        ``max_sessions_per_key`` for ``key``).

        Raises ``CapacityError`` when it may not open; pair every success with
        ``close_session``.
        """
        self.admit(transport, key)
        self.active += 1
        if key is not None:
            self.per_key[key] += 1
        session: AgentSession | None = None
        try:
            session = self.runtime.new_session(None, pace_output=pace_output)
            if changes:
                session.update(**changes)
            await session.start()
        except BaseException as exc:
            self._release(key)
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()
            if isinstance(exc, EngineBusy):  # the engine's cache is full: busy, like max_sessions
                raise self._refuse(transport, "engine_busy", f"the agent is busy: {exc}") from None
            raise
        live = LiveSession(ctx=self, transport=transport, session=session, key=key)
        self.live.add(live)
        self.metrics.sessions_active.labels(transport).inc()
        self.metrics.sessions_total.labels(transport).inc()
        log.info("%s session %s opened", transport, live.id)
        return live

    def _release(self, key: str | None) -> None:
        self.active -= 1
        if key is not None:
            self.per_key[key] -= 1
            if self.per_key[key] <= 0:
                del self.per_key[key]

    async def close_session(self, live: LiveSession) -> None:
        """Free ``live``'s slot and close its session (once; later calls do nothing)."""
        if live.closed:
            return
        live.closed = True
        self.live.discard(live)
        self._release(live.key)
        self.metrics.sessions_active.labels(live.transport).dec()
        if live._watch is not None and live._watch is not asyncio.current_task():
            live._watch.cancel()
        log.info("%s session %s closed", live.transport, live.id)
        try:
            await live.session.close()
        except Exception:  # a failing close must not take the server down
            log.exception("closing %s session %s failed", live.transport, live.id)

    async def drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new sessions; tell every live one the server is going away, let its
        answer in flight finish (up to ``grace_s``), then hang up. Returns when all are closed
        (or ``grace_s`` + 2 s have passed)."""
        self.draining = True
        live = list(self.live)
        log.info("draining %d session(s) (up to %.1f s)", len(live), grace_s)
        notice = Notice(
            "server_shutting_down",
            "the server is shutting down; this session ends now (reconnect to another server)",
            ws_code=1001,
        )
        ends = [asyncio.ensure_future(s.end(notice, grace_s)) for s in live]
        deadline = time.monotonic() + grace_s + 2.0
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in ends:
            await cancel_task(task)


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
    live: LiveSession,
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
    session = live.session
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
            log.warning("%s session %s dropped: %s", live.transport, live.id, dropped)
            ctx.metrics.client_errors.labels(live.transport, "output_queue_full").inc()
            if notify is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(notify(str(dropped)), NOTIFY_TIMEOUT_S)
        await ctx.close_session(live)
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
