"""The engine's scheduler: the one place that decides, between the worker's turns, which
lanes decode and which pre-fill chunk runs.

Decode: several sessions' lanes in one batched step.

Each answering session owns some lanes of the engine's :class:`DecodeRunner` (one, or two while
it reasons and speaks at once) and runs its own generator on the engine worker, which advances
the generators in turn (``realtime.engine.worker``). :meth:`Scheduler.take` gives a session the
tokens its lanes were fed at the next step. The first session to ask runs ``runner.step()`` for
*every* lane and keeps the other sessions' tokens for them; a session that asks again before the
others have taken theirs waits (gets ``None`` and gives way). So all sessions move in lockstep
and each step reads the weights once for all of them: when decoding is bound by reading the
weights, two callers cost about what one does.

Lanes are addressed by identity, never by row: the runner moves rows when a lane leaves.
Sessions join (``add``) and leave (``remove``) between steps.

Pre-fill: :meth:`Scheduler.prefill` is a generator that writes a sequence's embeddings
``prefill_chunk`` positions (``engine.prefill_chunk``) at a time and yields ``None`` between
chunks. A session's answer (run by the worker as a shared stream) pre-fills its turn and any
history re-fill through it, so the worker runs the other sessions' decode steps between the
chunks: a newcomer's long pre-fill delays each of them by one chunk at most, never by the
whole pre-fill. :func:`run_to_end` runs the same generator at once (calls outside an answer).

With a paged KV cache each step may need a new page for a lane. Before the step, every lane's
page is taken; a lane that gets none (the pool is full) leaves the runner and its session gets
:class:`~realtime.engine.base.EngineBusy` at its next ``take``, while the other lanes step on.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

import torch

from realtime.engine.base import EngineBusy
from realtime.models.decode import DecodeRunner, Lane, LaneSampling
from realtime.models.kv_pages import KVPoolFull


class Scheduler:
    def __init__(
        self,
        runner: DecodeRunner,
        prefill_chunk: int = 256,
        counters: dict[str, int] | None = None,
    ) -> None:
        """``counters``: the engine's event counters (``/metrics``); a lane taken off for want
        of a KV page counts as ``kv_pool_full``."""
        if prefill_chunk < 1:
            raise ValueError(f"engine.prefill_chunk must be positive, not {prefill_chunk}")
        self.runner = runner
        self.prefill_chunk = prefill_chunk
        self.prefill_chunks = 0  # pre-fill chunks run (for tests and benchmarks)
        self.counters = counters if counters is not None else {}
        self._pending: dict[int, int] = {}  # id(lane) -> the token it was fed at the last step
        self._starved: dict[int, str] = {}  # id(lane) -> why it was taken off (no KV page)
        self.steps = 0  # runner steps taken (for tests and benchmarks)
        self.pool_full = 0  # lanes taken off for want of a KV page

    def _row(self, lane: Lane) -> int:
        for k, other in enumerate(self.runner.lanes):
            if other is lane:
                return k
        raise KeyError("the lane is not on the runner (removed or never added)")

    def add(
        self,
        slot: int,
        position: int,
        sampling: LaneSampling,
        *,
        logits: torch.Tensor | None = None,
        token: int | None = None,
    ) -> Lane:
        k = self.runner.add_lane(slot, position, sampling, logits=logits, token=token)
        return self.runner.lanes[k]

    def remove(self, lane: Lane) -> None:
        """Take ``lane`` off the runner (a no-op if it is gone already)."""
        self._pending.pop(id(lane), None)
        self._starved.pop(id(lane), None)
        try:
            k = self._row(lane)
        except KeyError:
            return
        self.runner.remove_lane(k)

    def force(self, lane: Lane, token: int) -> None:
        """Feed ``token`` to ``lane`` at its next step instead of what it sampled."""
        self.runner.force(self._row(lane), token)

    def inject(self, lane: Lane, embeds: torch.Tensor) -> None:
        """Pre-fill ``embeds`` into ``lane`` at its position (see ``DecodeRunner.inject``)."""
        self.runner.inject(self._row(lane), embeds)

    def take(self, lanes: list[Lane]) -> list[int] | None:
        """The tokens ``lanes`` were fed at their next step, in order; ``None`` while other
        sessions have yet to take theirs from the last step (try again after they ran).
        :class:`EngineBusy` if one of ``lanes`` was taken off for want of a KV page."""
        starved = [self._starved.pop(id(lane)) for lane in lanes if id(lane) in self._starved]
        if starved:
            raise EngineBusy(f"the engine's KV memory is full: {starved[0]}")
        if lanes and all(id(lane) in self._pending for lane in lanes):
            return [self._pending.pop(id(lane)) for lane in lanes]
        if self._pending:
            return None
        for lane in lanes:
            self._row(lane)  # every lane asked for is on the runner
        self._grow(lanes)
        fed = self.runner.step()
        self.steps += 1
        for lane, tok in zip(self.runner.lanes, fed, strict=True):
            self._pending[id(lane)] = tok
        return [self._pending.pop(id(lane)) for lane in lanes]

    def _grow(self, asking: list[Lane]) -> None:
        """The page each lane writes at the next step; a lane that gets none leaves the runner
        (its session hears of it at its next ``take``; the asking session at once)."""
        cache = self.runner.cache
        for lane in list(self.runner.lanes):
            try:
                cache.ensure(lane.slot, lane.position + 1)
            except KVPoolFull as exc:
                self.runner.remove_lane(self._row(lane))
                self._starved[id(lane)] = str(exc)
                self.pool_full += 1
                self.counters["kv_pool_full"] = self.counters.get("kv_pool_full", 0) + 1
        mine = [self._starved.pop(id(lane)) for lane in asking if id(lane) in self._starved]
        if mine:
            raise EngineBusy(f"the engine's KV memory is full: {mine[0]}")

    def prefill(
        self,
        run: Callable[[torch.Tensor, int, int], torch.Tensor],
        embeds: torch.Tensor,
        slot: int,
        start: int,
    ) -> Generator[None, None, torch.Tensor]:
        """``run(piece, slot, position)`` over ``embeds [T, H]`` in chunks of at most
        ``prefill_chunk`` positions from ``start``, yielding ``None`` between chunks (the
        worker runs other sessions' steps there); returns the last position's logits."""
        if embeds.shape[0] == 0:
            raise ValueError("empty pre-fill")
        n = self.prefill_chunk
        for i in range(0, embeds.shape[0], n):
            if i:
                yield None
            logits = run(embeds[i : i + n], slot, start + i)
            self.prefill_chunks += 1
        return logits


T = TypeVar("T")


def run_to_end(gen: Generator[None, None, T]) -> T:
    """Run a scheduler generator (:meth:`Scheduler.prefill` and what is built on it) at once."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
