"""The engine's scheduler: the one place that decides, between the worker's turns, which
lanes decode and which pre-fill pieces run.

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

Pre-fill: every piece written into the cache outside a step is a :class:`PrefillJob` on one
queue, and :meth:`Scheduler.flush` runs the queued pieces of *all* sessions together, one
batched pass over the weights for up to ``prefill_chunk`` positions (``engine.prefill_chunk``):
with a few dozen callers, a pass per caller's 640 ms listening chunk, turn end and speaking
fork would outnumber the decode steps (each reads all the weights for a handful of
positions). Three kinds of piece:

* *deferred* (:meth:`defer`): nobody waits for it (a listening chunk, the assistant turn a
  commit writes). It runs with the next pass, or on its own once ``defer_ms`` old or once
  the deferred pieces fill a pass; the GPU is idle otherwise (``engine.between_jobs``).
* *awaited* (:meth:`prefill`, a generator): a turn's closing pre-fill, a history re-fill, the
  speaking fork. The generator yields ``None`` until its piece has run, a chunk of at most
  ``prefill_chunk`` positions at a time: the next :meth:`take` runs it before its step, so a
  newcomer's long pre-fill delays the others' steps by one bounded pass, never by the whole.
  :meth:`run_to_end` runs such a generator at once (calls outside an answer).
* *injected* (:meth:`inject`): a block inserted into a lane (reasoning handed to the speaking
  lane); it runs before the lane's next step, which goes on from the block's end.

With ``engine.prefill_in_step`` the pieces that no lane depends on (deferred and awaited ones
of sequences no lane decodes) ride in the next step instead: each position a row of the batch
that the lanes leave free (``DecodeRunner.step_riding``), so the weights are read once for the
step and the pieces. Only injections, and pieces too big for the free rows, still take a pass.

A sequence's pieces run in the order they were queued (contiguous ones merge into one row of
the pass); freeing or truncating a sequence (:meth:`free`, :meth:`truncate`) first drops its
queued pieces, whose pages go back with it.

With a paged KV cache each step may need a new page for a lane. Before the step, every lane's
page is taken; a lane that gets none (the pool is full) leaves the runner and its session gets
:class:`~realtime.engine.base.EngineBusy` at its next ``take``, while the other lanes step on.
A piece takes its pages when it is queued (:class:`EngineBusy` then, to the caller).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from realtime.engine.base import EngineBusy
from realtime.engine.work_timer import WorkTimer
from realtime.models.decode import MAX_RIDERS, DecodeRunner, Lane, LaneSampling, Rider
from realtime.models.kv_pages import KVPoolFull
from realtime.models.prefill import padded_shape

log = logging.getLogger(__name__)

T = TypeVar("T")


def padded_size(rows: int, longest: int) -> int:
    """Positions of a batched pass of ``rows`` pieces, the longest ``longest`` long, as
    ``Prefiller.prefill_batch`` pads it (``padded_shape``; one row is not padded)."""
    if rows <= 1:
        return longest
    padded_rows, t = padded_shape(rows, longest)
    return padded_rows * t


# why a pass ran (``/metrics``: ``prefill_passes_<reason>``): it held a piece injected into a
# lane (a hand-over of reasoning, a forced close), one a caller waited for (a turn's closing
# pre-fill, the speaking fork), or only deferred pieces (listening) that were due
PASS_REASONS = ("injection", "awaited", "deferred")


def pass_reason(jobs: list[PrefillJob]) -> str:
    if any(j.lane is not None for j in jobs):
        return "injection"
    return "awaited" if any(j.wait for j in jobs) else "deferred"


@dataclass(eq=False)
class PrefillJob:
    """One piece waiting for a pre-fill pass."""

    embeds: torch.Tensor  # [T, H]
    slot: int
    start: int
    wait: bool  # somebody waits for it: it runs at the next pass
    lane: Lane | None = None  # injected into this lane: it goes on from the piece's end
    forced: int | None = None  # ... and is fed this token next (``Scheduler.force``)
    queued: float = field(default_factory=time.monotonic)
    logits: torch.Tensor | None = None  # of its last position, once it ran
    done: bool = False
    error: BaseException | None = None

    @property
    def end(self) -> int:
        return self.start + self.embeds.shape[0]


@dataclass
class _Row:
    """One row of a pass: a slot's queued pieces that follow each other."""

    slot: int
    start: int
    jobs: list[PrefillJob]

    @property
    def end(self) -> int:
        return self.jobs[-1].end

    @property
    def tokens(self) -> int:
        return self.end - self.start


class Scheduler:
    def __init__(
        self,
        runner: DecodeRunner,
        prefill_chunk: int = 256,
        counters: dict[str, int] | None = None,
        defer_ms: int = 250,
        timer: WorkTimer | None = None,
    ) -> None:
        """``counters``: the engine's event counters (``/metrics``); a lane taken off for want
        of a KV page counts as ``kv_pool_full``. ``defer_ms``: how long a deferred piece may
        wait for a pass that runs anyway. ``timer``: times the steps and passes (``/metrics``)."""
        if prefill_chunk < 1:
            raise ValueError(f"engine.prefill_chunk must be positive, not {prefill_chunk}")
        self.runner = runner
        self.prefill_chunk = prefill_chunk
        self.defer_s = defer_ms / 1000
        self.timer = timer or WorkTimer(runner.device)
        self.counters = counters if counters is not None else {}
        for why in PASS_REASONS:  # every key from the start: other threads read the dict
            self.counters.setdefault(f"prefill_passes_{why}", 0)
        self.counters.setdefault("prefill_riders", 0)  # pieces that rode in a step instead
        self._queue: list[PrefillJob] = []
        self._pending: dict[int, int] = {}  # id(lane) -> the token it was fed at the last step
        self._starved: dict[int, str] = {}  # id(lane) -> why it was taken off (no KV page)
        self._forced: dict[int, int] = {}  # id(lane) -> the token forced for its next step
        self.steps = 0  # runner steps taken (for tests and benchmarks)
        self.pool_full = 0  # lanes taken off for want of a KV page
        self.prefill_chunks = 0  # pieces pre-filled (rows of the passes)
        self.passes = 0  # pre-fill passes run
        self.pass_tokens: list[int] = []  # positions of each pass (the last 1000)

    # ---- lanes ----------------------------------------------------------------------------
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
        self._forced.pop(id(lane), None)
        try:
            k = self._row(lane)
        except KeyError:
            return
        self.runner.remove_lane(k)

    def force(self, lane: Lane, token: int) -> None:
        """Feed ``token`` to ``lane`` at its next step instead of what it sampled (also
        after an injection queued before or after this call, which would otherwise sample
        over it)."""
        if id(lane) in self._starved:  # (a lane taken off hears of it at its take)
            return
        self._forced[id(lane)] = token
        job = next((j for j in self._queue if j.lane is lane), None)
        if job is not None:
            job.forced = token
        else:
            self.runner.force(self._row(lane), token)

    def inject(self, lane: Lane, embeds: torch.Tensor) -> None:
        """Insert ``embeds`` into ``lane`` at its position before its next step, which then
        goes on from their end (see ``DecodeRunner.inject``). The lane's position moves when
        the piece runs (at the latest at the next :meth:`take`)."""
        self._submit(embeds, lane.slot, lane.position, wait=True, lane=lane)

    def take(self, lanes: list[Lane]) -> list[int] | None:
        """The tokens ``lanes`` were fed at their next step, in order; ``None`` while other
        sessions have yet to take theirs from the last step (try again after they ran).
        :class:`EngineBusy` if one of ``lanes`` was taken off for want of a KV page. The
        queued pre-fill pieces that are due run before the step."""
        starved = [self._starved.pop(id(lane)) for lane in lanes if id(lane) in self._starved]
        if starved:
            raise EngineBusy(f"the engine's KV memory is full: {starved[0]}")
        if lanes and all(id(lane) in self._pending for lane in lanes):
            return [self._pending.pop(id(lane)) for lane in lanes]
        if self._pending:
            return None
        for lane in lanes:
            self._row(lane)  # every lane asked for is on the runner
        riding = self._board()  # before the pass: a sequence's pieces either all ride or none
        try:
            self.flush()
            self._grow(lanes)
        except BaseException:  # no step now: they wait for the next one, in their order
            self._queue[:0] = [j for _, run in riding for j in run]
            raise
        with self.timer.track("decode_step"):
            if riding:
                try:
                    fed, logits = self.runner.step_riding([r for r, _ in riding])
                except BaseException as exc:  # their owners hear of it, as after a pass
                    for _, run in riding:
                        for job in run:
                            job.done, job.error = True, exc
                    raise
                self._arrived(riding, logits)
            else:
                fed = self.runner.step()
        self.steps += 1
        self._forced.clear()  # fed now
        for lane, tok in zip(self.runner.lanes, fed, strict=True):
            self._pending[id(lane)] = tok
        return [self._pending.pop(id(lane)) for lane in lanes]

    def _grow(self, asking: list[Lane]) -> None:
        """The page each lane writes at the next step; a lane that gets none leaves the runner
        (its session hears of it at its next ``take``; the asking session at once)."""
        cache = self.runner.cache
        for lane in list(self.runner.lanes):
            try:
                cache.ensure(lane.slot, lane.position + 1, lane.position)
            except KVPoolFull as exc:
                self.runner.remove_lane(self._row(lane))
                self._starved[id(lane)] = str(exc)
                self.pool_full += 1
                self.counters["kv_pool_full"] = self.counters.get("kv_pool_full", 0) + 1
        mine = [self._starved.pop(id(lane)) for lane in asking if id(lane) in self._starved]
        if mine:
            raise EngineBusy(f"the engine's KV memory is full: {mine[0]}")

    # ---- pre-fill -------------------------------------------------------------------------
    def _board(self) -> list[tuple[Rider, list[PrefillJob]]]:
        """Take off the queue the pieces that ride in the next step: whole sequences' queues,
        in queue order, of sequences that no lane decodes and nothing is injected into, while
        the free rows last; contiguous pieces merge into one rider up to one that is awaited
        (its logits are its own last position's)."""
        room = self.runner.room
        if room <= 0 or not self._queue:
            return []
        busy = {lane.slot for lane in self.runner.lanes}
        by_slot: dict[int, list[PrefillJob]] = {}
        for job in self._queue:
            by_slot.setdefault(job.slot, []).append(job)
        out: list[tuple[Rider, list[PrefillJob]]] = []
        for slot, jobs in by_slot.items():
            rows = sum(j.embeds.shape[0] for j in jobs)
            if slot in busy or any(j.lane is not None for j in jobs) or rows > room:
                continue
            runs: list[list[PrefillJob]] = []
            for job in jobs:
                last = runs[-1][-1] if runs else None
                if last is None or last.wait or job.start != last.end:
                    runs.append([job])
                else:
                    runs[-1].append(job)
            if len(out) + len(runs) > MAX_RIDERS:
                continue
            for run in runs:
                embeds = torch.cat([j.embeds for j in run]) if len(run) > 1 else run[0].embeds
                out.append((Rider(embeds, slot, run[0].start), run))
            room -= rows
        boarded = {id(j) for _, run in out for j in run}
        self._queue = [j for j in self._queue if id(j) not in boarded]
        return out

    def _arrived(self, riding: list[tuple[Rider, list[PrefillJob]]], logits: torch.Tensor) -> None:
        """The riders' pieces are written: done, each run's logits to its last piece."""
        for i, (_, run) in enumerate(riding):
            for job in run:
                job.done = True
            run[-1].logits = logits[i]
        self.prefill_chunks += len(riding)
        self.counters["prefill_riders"] += len(riding)

    def _submit(
        self, embeds: torch.Tensor, slot: int, start: int, wait: bool, lane: Lane | None = None
    ) -> PrefillJob:
        """Queue one piece (its pages taken now: :class:`EngineBusy` if there are none)."""
        if embeds.shape[0] == 0:
            raise ValueError("empty pre-fill")
        try:
            self.runner.cache.ensure(slot, start + embeds.shape[0], start)
        except KVPoolFull as exc:
            self.counters["kv_pool_full"] = self.counters.get("kv_pool_full", 0) + 1
            raise EngineBusy(f"the engine's KV memory is full: {exc}") from None
        forced = self._forced.get(id(lane)) if lane is not None else None
        job = PrefillJob(embeds, slot, start, wait, lane, forced)
        self._queue.append(job)
        return job

    def defer(self, embeds: torch.Tensor, slot: int, start: int) -> None:
        """Write ``embeds [T, H]`` into ``slot`` from ``start`` with a later pass (nobody waits
        for it; the slot's later pieces and steps come after it)."""
        n = self.prefill_chunk
        for i in range(0, embeds.shape[0], n):
            self._submit(embeds[i : i + n], slot, start + i, wait=False)

    def prefill(
        self, embeds: torch.Tensor, slot: int, start: int
    ) -> Generator[None, None, torch.Tensor]:
        """Write ``embeds [T, H]`` into ``slot`` from ``start``, ``prefill_chunk`` positions at a
        time, each with the next pass; yields ``None`` while a chunk waits for it (the worker
        runs other sessions' steps, and the pass, there; with no lane on the runner, no step
        is coming, and the generator runs the pass itself after giving way once). Returns
        the last position's logits."""
        if embeds.shape[0] == 0:
            raise ValueError("empty pre-fill")
        n = self.prefill_chunk
        logits: torch.Tensor | None = None
        for i in range(0, embeds.shape[0], n):
            job = self._submit(embeds[i : i + n], slot, start + i, wait=True)
            logits = yield from self._await(job)
        assert logits is not None
        return logits

    def _await(self, job: PrefillJob) -> Generator[None, None, torch.Tensor]:
        """Wait for ``job``'s pass (see :meth:`prefill`); its logits."""
        try:
            yield None  # the others queue their pieces meanwhile: one pass for all
            while not job.done:
                if not self.runner.lanes:  # no step is coming to run the pass: run it
                    self.flush()
                    continue
                yield None
        finally:  # closed while it waits (a cancelled answer): nobody wants it now
            if not job.done:
                self._queue = [j for j in self._queue if j is not job]
        if job.error is not None:
            raise job.error
        assert job.logits is not None
        return job.logits

    def prefill_and_fork(
        self, embeds: torch.Tensor, slot: int, start: int, fork: int, tail: torch.Tensor
    ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor] | None]:
        """:meth:`prefill` of ``embeds``, and in the same pass ``fork``
        made a copy of ``slot`` followed by ``tail``: the rows of ``slot`` already in the cache
        are copied now, its queued pieces and ``embeds`` are pre-filled a second time, into
        ``fork``, then ``tail``. Returns the logits of ``embeds``' last position and of
        ``tail``'s; ``None``, with nothing done, when the queued pieces do not lead up to
        ``start`` or the fork's row would not fit one pass. (A turn's closing pre-fill and
        its speaking fork: one pass where a copy after the closing pass took a second one.)
        :class:`KVPoolFull` without pages for the copy."""
        queued = sorted((j for j in self._queue if j.slot == slot), key=lambda j: j.start)
        first = queued[0].start if queued else start
        end = first
        for job in queued:
            if job.start != end:
                return None
            end = job.end
        row = [*(j.embeds for j in queued), embeds, tail]
        if end != start or sum(r.shape[0] for r in row) > self.prefill_chunk:
            return None
        self.runner.cache.copy_prefix(slot, fork, first)
        forked = self._submit(torch.cat(row), fork, first, wait=True)
        mine = self._submit(embeds, slot, start, wait=True)
        try:
            logits = yield from self._await(mine)
            return logits, (yield from self._await(forked))
        finally:
            if not forked.done:
                self._queue = [j for j in self._queue if j is not forked]

    def run_to_end(self, gen: Generator[None, None, T]) -> T:
        """Run a generator of :meth:`prefill` (and what is built on it) at once: a pass
        whenever it waits (other sessions' queued pieces go along)."""
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value
            self.flush(force=True)

    def drop(self, slot: int, from_position: int = 0) -> None:
        """Forget the queued pieces of ``slot`` at or after ``from_position`` (its pages are
        about to go back); a piece that someone waits for fails."""
        keep = []
        for job in self._queue:
            if job.slot == slot and job.end > from_position:
                job.done, job.error = True, RuntimeError("pre-fill dropped: its sequence was freed")
            else:
                keep.append(job)
        self._queue = keep

    def truncate(self, slot: int, length: int) -> None:
        """``cache.truncate`` after dropping the queued pieces beyond ``length``."""
        self.drop(slot, length)
        self.runner.cache.truncate(slot, length)

    def free(self, slots: list[int]) -> None:
        """``cache.free`` after dropping the slots' queued pieces."""
        for slot in slots:
            self.drop(slot)
        self.runner.cache.free(slots)

    @property
    def queued(self) -> int:
        """Positions waiting for a pass."""
        return sum(j.embeds.shape[0] for j in self._queue)

    def flush(self, force: bool = False) -> int:
        """Run the queued pieces that are due: with ``force`` all of them; otherwise, if a
        piece is awaited or injected, or the deferred ones are ``defer_ms`` old or fill a
        pass, one pass (more only for injections, which must run before the next step).
        Returns the passes run."""
        if not self._queue:
            return 0
        due = (
            force
            or any(j.wait for j in self._queue)
            or self.queued >= self.prefill_chunk
            or time.monotonic() - self._queue[0].queued >= self.defer_s
        )
        if not due:
            return 0
        passes = 0
        while self._queue and (
            passes == 0 or force or any(j.lane is not None for j in self._queue)
        ):
            self._pass(self._pick())
            passes += 1
        return passes

    def _pick(self) -> list[_Row]:
        """The rows of the next pass: injected pieces' slots first, then in queue order; a
        slot's pieces in their order, merged while they follow each other and nobody waits on
        an earlier one (its logits are its own last position's); at most ``prefill_chunk``
        positions *as padded* (:func:`padded_size`: padding costs as much as real positions
        once a pass is bound by arithmetic), at least one piece."""
        first: dict[int, PrefillJob] = {}
        for job in self._queue:
            first.setdefault(job.slot, job)
        order = sorted(first, key=lambda s: first[s].lane is None)  # stable: queue order
        rows: dict[int, _Row] = {}
        longest = 0
        for slot in order:
            for job in (j for j in self._queue if j.slot == slot):
                row = rows.get(slot)
                # not mergeable (the slot's next piece waits for a later pass): a gap, an
                # earlier piece someone waits on, or an injection (its lane goes on from the
                # end of its own piece, by the row's length)
                if row is not None and (
                    job.start != row.end or row.jobs[-1].wait or job.lane is not None
                ):
                    break
                n = job.embeds.shape[0] + (row.tokens if row is not None else 0)
                size = padded_size(len(rows) + (row is None), max(longest, n))
                if rows and size > self.prefill_chunk:
                    break
                if row is None:
                    rows[slot] = _Row(slot, job.start, [job])
                else:
                    row.jobs.append(job)
                longest = max(longest, n)
        return list(rows.values())

    def _pass(self, rows: list[_Row]) -> None:
        """One batched pre-fill of ``rows``; their pieces are done (or failed) after it."""
        jobs = [j for r in rows for j in r.jobs]
        taken = set(map(id, jobs))
        self._queue = [j for j in self._queue if id(j) not in taken]
        lanes = []
        for r in rows:
            lane = r.jobs[-1].lane
            k = -1
            if lane is not None:
                try:
                    k = self._row(lane)
                except KeyError:
                    pass  # the lane left meanwhile: the piece is written all the same
            lanes.append(k)
        embeds = torch.cat([j.embeds for j in jobs]) if len(jobs) > 1 else jobs[0].embeds
        try:
            with self.timer.track("prefill_pass"):
                logits = self.runner.prefill_batch(
                    embeds, [r.slot for r in rows], [r.start for r in rows],
                    [r.tokens for r in rows], lanes,
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - each piece's owner hears of it
            log.exception("a pre-fill pass of %d pieces failed", len(jobs))
            self.counters["prefill_errors"] = self.counters.get("prefill_errors", 0) + 1
            for j in jobs:
                j.done, j.error = True, exc
            return
        for i, r in enumerate(rows):
            for j in r.jobs:
                j.done = True
            r.jobs[-1].logits = logits[i]
            forced = r.jobs[-1].forced
            if forced is not None and lanes[i] >= 0:
                self.runner.force(lanes[i], forced)
        self.passes += 1
        why = pass_reason(jobs)
        self.counters[f"prefill_passes_{why}"] += 1
        self.prefill_chunks += len(rows)
        self.pass_tokens = [*self.pass_tokens[-999:], sum(r.tokens for r in rows)]
