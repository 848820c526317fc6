"""Runs an engine on its own thread so that model work never blocks the event loop.

One worker thread owns the model: every blocking engine call is a job on its queue, and
token streams come back to the loop through ``loop.call_soon_threadsafe``. A slow decoding
step therefore delays only other model work, never audio I/O.

Token streams are advanced one item (one decoding step) at a time. A *shared* stream
(``exclusive=False``, for engines whose sessions keep separate state) takes turns with the
other shared streams, and queued jobs (another session's pre-fill, a new session) run between
its steps: a second caller's answer starts while the first one is still being written, instead
of after it. An *exclusive* stream (an engine whose sessions share one decode runner) runs to
its end before anything else. A stream may yield ``None`` to give way without producing an item.

After each batch of jobs the worker calls its ``between`` hook (the engine's
``between_jobs``: the Step-Audio engine runs its queued pre-fill pieces there while no lane
decodes).

Between two items of the shared streams the worker runs the queued jobs for up to
``JOB_BUDGET_S`` (at least one): one job per step let a backlog grow without bound whenever jobs
came faster than steps (twenty callers' audio while others were answered: seconds of delay),
and an unbounded drain could hold a step back for as long as the queue is long.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
_STOP = object()
# queued jobs run between two stream items for this long at most (at least one job): a step's
# delay stays bounded (a 25 ms step then 20 ms of jobs still gives each lane 22 tokens/s, three
# times what speech needs) while the queue drains
JOB_BUDGET_S = 0.02


def _finished() -> Iterator[Any]:
    return iter(())


class _Stream:
    """A generator run on the worker, handing each item to the loop."""

    def __init__(self, make_iter: Callable[[], Iterator[Any]], emit: Callable[[Any], None]):
        self.make_iter = make_iter
        self.emit = emit
        self.it: Iterator[Any] | None = None
        self.done: Future[None] = Future()

    def advance(self) -> bool:
        """Run the generator to its next item; False once it is finished (or nobody listens)."""
        try:
            if self.it is None:
                if not self.done.set_running_or_notify_cancel():
                    return False
                self.it = self.make_iter()
            item = next(self.it)
        except StopIteration:
            self._finish()
            return False
        except BaseException as exc:  # noqa: BLE001 - re-raised on the loop
            self._send(_Raise(exc))
            self._finish()
            return False
        if item is not None and not self._send(item):
            self.it.close()  # the consumer's loop is gone: stop generating for nobody
            self._finish()
            return False
        return True

    def _send(self, item: Any) -> bool:
        try:
            self.emit(item)
        except RuntimeError:  # the event loop that asked for this stream is closed
            return False
        return True

    def _finish(self) -> None:
        self._send(_STOP)
        if not self.done.done():
            self.done.set_result(None)
        self.it = None  # let go of the generator and what it holds (the session)
        self.make_iter = _finished


class EngineWorker:
    def __init__(self, name: str = "engine") -> None:
        # run after each batch of jobs (the engine's ``between_jobs``: queued pre-fill
        # pieces while nothing decodes); set once the engine is built
        self.between: Callable[[], None] | None = None
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        shared: deque[_Stream] = deque()  # streams taking turns, one item each
        while True:
            try:
                job = self._jobs.get(block=not shared)
            except queue.Empty:
                job = None
            if job is _STOP:
                return
            if job is not None:
                deadline = time.monotonic() + JOB_BUDGET_S
                self._do(job, shared)
                job = None  # hold nothing between jobs: a finished session can be freed
                if self._drain(shared, deadline):
                    return
                self._between()
            if shared:  # jobs for a while, then one step: neither side can starve the other
                stream = shared.popleft()
                if stream.advance():
                    shared.append(stream)
                del stream

    def _drain(self, shared: deque[_Stream], deadline: float) -> bool:
        """More queued jobs until ``deadline`` (all of them while no stream is waiting); True
        if the worker was told to stop."""
        while not shared or time.monotonic() < deadline:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return False
            if job is _STOP:
                return True
            self._do(job, shared)
            job = None
        return False

    def _between(self) -> None:
        hook = self.between
        if hook is None:
            return
        try:
            hook()
        except Exception:  # noqa: BLE001 - the hook's own failures are its owners' to report
            log.exception("the engine's between-jobs hook failed")

    @staticmethod
    def _do(job: tuple[Any, Any], shared: deque[_Stream]) -> None:
        first, second = job
        if isinstance(first, _Stream):
            if second:  # exclusive: to its end now
                while first.advance():
                    pass
            else:
                shared.append(first)
            return
        fut: Future[Any] = second
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(first())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        return fut

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread and await its result."""
        return await asyncio.wrap_future(self.submit(fn))

    async def stream(
        self, make_iter: Callable[[], Iterator[T | None]], exclusive: bool = True
    ) -> AsyncIterator[T]:
        """Run a blocking generator on the worker thread, yielding its items on the loop.
        ``exclusive=False``: other work and other shared streams run between its items."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        stream = _Stream(make_iter, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        self._jobs.put((stream, exclusive))
        while True:
            item = await q.get()
            if item is _STOP:
                break
            if isinstance(item, _Raise):
                raise item.exc
            yield item
        await asyncio.wrap_future(stream.done)

    def close(self) -> None:
        self._jobs.put(_STOP)
        self._thread.join(timeout=5)


class _Raise:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
