"""A tensor-parallel decode runner: rank 0's calls mirrored on the other ranks.

Under tensor parallelism (:mod:`realtime.models.tensor_parallel`) every rank holds a shard of
the decoder, a shard of the KV cache (its KV heads) and its own :class:`DecodeRunner` over
them, and every forward pass has all-reduces in it: the ranks must run the same pre-fills and
steps, over the same lanes and the same pages, in the same order. Rank 0 is the engine; the
other ranks are *followers* that only repeat what it does.

* :class:`MirroredRunner` and :class:`MirroredCache` stand in for rank 0's runner and KV cache
  (the same interface; reads pass through). Each call that changes state on the device or the
  page bookkeeping (``prefill``, ``add_lane``, ``remove_lane``, ``inject``, ``force``,
  ``clear``, ``step``, ``capture_all``; ``allocate``, ``free``, ``ensure``, ``truncate``,
  ``copy_prefix``) is first sent to every follower as a small command over its pipe (the
  method and its plain arguments, pickled), then its tensor arguments (embeddings from the
  audio encoder or the text embeddings, a lane's first logits: rank 0 alone has them) are
  broadcast over the process group, then rank 0 runs the call itself. A lock keeps command
  order equal to execution order whatever thread calls.
* :func:`follow` is a follower's loop: it receives each command and its tensors and makes the
  same call on its own runner or cache. A call that fails on rank 0 fails the same way on
  each follower (their state is the same), so a follower just goes on.
* Sampling: every rank has the same full logits (``lm_head`` split by vocabulary and the
  slices all-gathered, or replicated: ``tensor_parallel.py``), so greedy tokens agree.
  Where a lane samples (temperature > 0), rank 0's choice is authoritative: after every
  call that samples (``step``, ``add_lane``, ``inject``) rank 0 broadcasts its ``ids``
  buffer (the tokens the next step feeds) and the followers take it.
* ``ensure`` that takes no page (most steps) changes nothing on any rank: not sent.

A follower also answers ``stats`` (its lanes, pages, memory): the tests compare its state with
rank 0's, benchmarks read its memory. With ``check`` on (tests), each follower sends its state
back after every call and rank 0 compares it with its own (:func:`runner_state`): a call left
out of the mirror is a :class:`RanksDiverged` error at that call, where it would otherwise be
collectives of different shapes (gloo aborts the process, NCCL hangs or reads garbage).
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from realtime.models.decode import DecodeRunner
from realtime.models.kv_pages import PagedKVCache

log = logging.getLogger(__name__)

CLOSE = "close"
STATS = "stats"
RUNNER_CALLS = (
    "prefill", "prefill_batch", "add_lane", "remove_lane", "inject", "force", "clear", "step",
    "capture_all",
)  # fmt: skip
CACHE_CALLS = ("allocate", "free", "ensure", "truncate", "copy_prefix")
SAMPLING_CALLS = (
    "step",
    "add_lane",
    "inject",
    "prefill_batch",
)  # may sample: rank 0's ids are broadcast after


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument in a command: it follows over the process group."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _pack(values: list[Any], tensors: list[torch.Tensor]) -> list[Any]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            out.append(TensorArg(tuple(v.shape), v.dtype))
        else:
            out.append(v)
    return out


def _broadcast(t: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.broadcast(t, src=0)


def _sync_sampled(runner: DecodeRunner, name: str) -> None:
    """Rank 0's next-step tokens to every rank, where a lane samples (every rank calls it
    after the same call, with the same lanes)."""
    if name in SAMPLING_CALLS and any(ln.sampling.temperature > 0 for ln in runner.lanes):
        _broadcast(runner.ids)


class RanksDiverged(RuntimeError):
    """A follower's runner or pages differ from rank 0's after a call (``check`` mode)."""


def runner_state(runner: DecodeRunner, cache: PagedKVCache) -> dict[str, Any]:
    """What every rank must hold alike: lanes, next tokens, pages (reads ``ids``: a sync)."""
    return {
        "lanes": [(ln.slot, ln.position, ln.sampling.temperature) for ln in runner.lanes],
        "ids": runner.ids[: len(runner.lanes)].tolist(),
        "tables": [list(t) for t in cache.tables],
        "lengths": list(cache.lengths),
        "free_slots": cache.free_slots,
        "pages_used": cache.pages_used,
    }


class Leader:
    """Rank 0's end: the followers' pipes and the order of the calls."""

    def __init__(
        self,
        conns: list[Connection],
        device: torch.device,
        runner: DecodeRunner,
        cache: PagedKVCache,
        check: bool = False,
    ) -> None:
        self.conns = conns
        self.device = device
        self.runner = runner
        self.cache = cache
        self.check = check
        self._lock = threading.Lock()
        self.closed = False
        self.commands = 0  # sent (for tests and benchmarks)

    def call(
        self,
        target: str,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        runner: DecodeRunner | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send ``target.name(*args, **kwargs)`` to every follower, then run ``fn`` here (and,
        for a ``runner`` call that may sample, broadcast its next tokens)."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the tensor-parallel ranks are closed")
            tensors: list[torch.Tensor] = []
            plain = _pack(list(args), tensors)
            keys = list(kwargs)
            plain_kw = dict(zip(keys, _pack([kwargs[k] for k in keys], tensors), strict=True))
            msg = pickle.dumps((target, name, plain, plain_kw), protocol=pickle.HIGHEST_PROTOCOL)
            for conn in self.conns:
                conn.send_bytes(msg)
            self.commands += 1
            for t in tensors:
                _broadcast(t.to(self.device).contiguous())
            try:
                out = fn(*args, **kwargs)
                if runner is not None:
                    _sync_sampled(runner, name)
            finally:
                if self.check:
                    self._compare(f"{target}.{name}")
            return out

    def _compare(self, call: str) -> None:
        mine = runner_state(self.runner, self.cache)
        for rank, conn in enumerate(self.conns, 1):
            theirs = conn.recv()
            if theirs != mine:
                diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs.get(k)}
                raise RanksDiverged(
                    f"tensor parallel rank {rank} differs from rank 0 after {call}: "
                    f"(rank 0, rank {rank}) {diff}"
                )

    def stats(self) -> list[dict[str, Any]]:
        """Each follower's :func:`follower_stats`, asked after every command sent so far."""
        with self._lock:
            msg = pickle.dumps(("", STATS, [], {}))
            for conn in self.conns:
                conn.send_bytes(msg)
            return [conn.recv() for conn in self.conns]

    def close(self) -> None:
        """Tell the followers to leave their loop (no more calls after this)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            msg = pickle.dumps(("", CLOSE, [], {}))
            for conn in self.conns:
                try:
                    conn.send_bytes(msg)
                except OSError:  # that follower is gone already
                    pass


class MirroredCache:
    """Rank 0's KV cache, its changes mirrored on the followers (see the module doc)."""

    def __init__(self, cache: PagedKVCache, leader: Leader) -> None:
        self._cache = cache
        self._leader = leader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def _call(self, name: str, *args: Any) -> Any:
        return self._leader.call("cache", name, getattr(self._cache, name), *args)

    def allocate(self, n: int = 1) -> list[int]:
        return self._call("allocate", n)

    def free(self, slots: list[int]) -> None:
        self._call("free", list(slots))

    def ensure(self, slot: int, length: int, start: int | None = None) -> None:
        if self._cache.changes(slot, length, start):  # else nothing changes on any rank
            self._call("ensure", slot, length, start)

    def truncate(self, slot: int, length: int) -> None:
        self._call("truncate", slot, length)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self._call("copy_prefix", src, dst, n)


class MirroredRunner:
    """Rank 0's :class:`DecodeRunner`, every call that changes state mirrored on the followers;
    ``cache`` is the :class:`MirroredCache` (the scheduler takes pages through it)."""

    def __init__(self, runner: DecodeRunner, cache: MirroredCache, leader: Leader) -> None:
        self._runner = runner
        self.cache = cache
        self.leader = leader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self._runner, name)
        return self.leader.call("runner", name, fn, *args, runner=self._runner, **kwargs)

    def prefill(self, embeds: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        return self._call("prefill", embeds, slot, start)

    def prefill_batch(
        self,
        embeds: torch.Tensor,
        slots: list[int],
        starts: list[int],
        lengths: list[int],
        lanes: list[int],
    ) -> torch.Tensor:
        return self._call("prefill_batch", embeds, slots, starts, lengths, lanes)

    def add_lane(self, slot: int, position: int, sampling: Any, **kw: Any) -> int:
        return self._call("add_lane", slot, position, sampling, **kw)

    def remove_lane(self, k: int) -> None:
        self._call("remove_lane", k)

    def inject(self, k: int, embeds: torch.Tensor) -> None:
        self._call("inject", k, embeds)

    def force(self, k: int, token: int) -> None:
        self._call("force", k, token)

    def clear(self) -> None:
        self._call("clear")

    def step(self) -> list[int]:
        return self._call("step")

    def capture_all(self, greedy: bool = True, sample: bool = False) -> int:
        return self._call("capture_all", greedy, sample)


def follower_stats(runner: DecodeRunner, cache: PagedKVCache) -> dict[str, Any]:
    """What a follower holds (:func:`runner_state`) and, on a GPU, its memory."""
    out = runner_state(runner, cache)
    if runner.is_cuda:
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated(runner.device)
        out["memory_allocated"] = torch.cuda.memory_allocated(runner.device)
        out["max_memory_reserved"] = torch.cuda.max_memory_reserved(runner.device)
    return out


def follow(
    conn: Connection, runner: DecodeRunner, cache: PagedKVCache, check: bool = False
) -> None:
    """A follower's loop: repeat rank 0's calls until it says ``close`` or its pipe closes
    (``check``: send :func:`runner_state` back after each)."""
    targets = {"runner": runner, "cache": cache}
    with torch.inference_mode():
        while True:
            try:
                target, name, args, kwargs = pickle.loads(conn.recv_bytes())
            except EOFError:
                log.warning("tensor parallel: rank 0's pipe closed; leaving")
                return
            if name == CLOSE:
                return
            if name == STATS:
                conn.send(follower_stats(runner, cache))
                continue
            allowed = RUNNER_CALLS if target == "runner" else CACHE_CALLS
            if name not in allowed:
                raise RuntimeError(f"tensor parallel: unknown command {target}.{name}")
            args = [_receive(a, runner.device) for a in args]
            kwargs = {k: _receive(v, runner.device) for k, v in kwargs.items()}
            try:
                getattr(targets[target], name)(*args, **kwargs)
                if target == "runner":
                    _sync_sampled(runner, name)
            except Exception as exc:  # noqa: BLE001 - rank 0's same call failed the same way
                log.debug("tensor parallel: %s.%s failed as on rank 0: %s", target, name, exc)
            if check:
                conn.send(runner_state(runner, cache))


def _receive(v: Any, device: torch.device) -> Any:
    if not isinstance(v, TensorArg):
        return v
    t = torch.empty(v.shape, dtype=v.dtype, device=device)
    _broadcast(t)
    return t
