"""Runs an engine on its own thread so that model work never blocks the event loop.

One worker thread owns the model: every blocking engine call is a job on its queue, and
token streams come back to the loop through ``loop.call_soon_threadsafe``. A slow decoding
step therefore delays only other model work, never audio I/O.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
_STOP = object()


class EngineWorker:
    def __init__(self, name: str = "engine") -> None:
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        return fut

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread and await its result."""
        return await asyncio.wrap_future(self.submit(fn))

    async def stream(self, make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Run a blocking generator on the worker thread, yielding its items on the loop."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()

        def pump() -> None:
            try:
                for item in make_iter():
                    loop.call_soon_threadsafe(q.put_nowait, item)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the loop
                loop.call_soon_threadsafe(q.put_nowait, _Raise(exc))
            finally:
                loop.call_soon_threadsafe(q.put_nowait, _STOP)

        fut = self.submit(pump)
        while True:
            item = await q.get()
            if item is _STOP:
                break
            if isinstance(item, _Raise):
                raise item.exc
            yield item
        await asyncio.wrap_future(fut)

    def close(self) -> None:
        self._jobs.put(_STOP)
        self._thread.join(timeout=5)


class _Raise:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
