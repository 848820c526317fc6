"""What a session may leave behind, counted before and after: asyncio tasks, threads, the
engine's free cache slots, open sessions and open aiortc peer connections.

    before = snapshot(runtime)
    ...  # open sessions, break them, close them
    await assert_no_leaks(before)  # everything is back within a second, or it says what is not

Idle workers of a thread pool that existed before (the recognizer's thread) and of the event
loop's default executor (``asyncio_N``, which aiortc and ``run_in_executor`` use) may grow up to
their pool's size and are not leaks; a thread of a new pool is.
"""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

_POOL_WORKER = re.compile(r"^(.*?)_\d+$")  # ThreadPoolExecutor-3_0, asyncio_1, asr_0


@dataclass
class Snapshot:
    tasks: set[asyncio.Task[Any]]
    threads: set[threading.Thread]
    free_slots: int | None  # the engine's free cache slots (engines with a slot cache)
    sessions: int | None  # the runtime's open sessions
    peers: int  # aiortc peer connections not closed
    runtime: Any = field(default=None, repr=False)


def _free_slots(runtime: Any) -> int | None:
    cache = getattr(getattr(runtime, "engine", None), "cache", None)
    free = getattr(cache, "free_slots", None)
    return free if isinstance(free, int) else None


def _open_peers() -> int:
    try:
        from aiortc import RTCPeerConnection
    except ImportError:  # pragma: no cover - aiortc is a dependency
        return 0
    return sum(
        1
        for o in gc.get_objects()
        if type(o) is RTCPeerConnection and o.connectionState != "closed"
    )


def _tasks() -> set[asyncio.Task[Any]]:
    try:
        return set(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        return set()


def snapshot(runtime: Any = None) -> Snapshot:
    """The counts now (call it inside the test's event loop to see its tasks)."""
    sessions = getattr(runtime, "sessions", None)
    return Snapshot(
        tasks=_tasks(),
        threads=set(threading.enumerate()),
        free_slots=_free_slots(runtime),
        sessions=None if sessions is None else len(sessions),
        peers=_open_peers(),
        runtime=runtime,
    )


def _pool(thread: threading.Thread) -> str | None:
    m = _POOL_WORKER.match(thread.name)
    return m.group(1) if m else None


def leaks(before: Snapshot) -> list[str]:
    """What is there now and was not before (empty: nothing leaked)."""
    now = snapshot(before.runtime)
    out: list[str] = []
    current = asyncio.current_task() if now.tasks else None
    tasks = [t for t in now.tasks - before.tasks if t is not current and not t.done()]
    if tasks:
        out.append(f"{len(tasks)} task(s): " + ", ".join(repr(t.get_coro()) for t in tasks[:5]))
    pools = ({_pool(t) for t in before.threads} - {None}) | {"asyncio"}
    threads = [t for t in now.threads - before.threads if t.is_alive() and _pool(t) not in pools]
    if threads:
        out.append(f"{len(threads)} thread(s): " + ", ".join(t.name for t in threads))
    if before.free_slots is not None and now.free_slots != before.free_slots:
        out.append(f"free cache slots {now.free_slots}, were {before.free_slots}")
    if before.sessions is not None and now.sessions != before.sessions:
        out.append(f"open sessions {now.sessions}, were {before.sessions}")
    if now.peers > before.peers:
        out.append(f"open peer connections {now.peers}, were {before.peers}")
    return out


async def assert_no_leaks(before: Snapshot, timeout: float = 1.0) -> None:
    """Wait up to ``timeout`` seconds for everything to be back as ``before`` was."""
    deadline = time.monotonic() + timeout
    while True:
        found = leaks(before)
        if not found:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"not freed within {timeout} s: " + "; ".join(found))
        await asyncio.sleep(0.05)
