"""``engine.tensor_parallel: N``: the Step-Audio decoder split over N ranks, ranks 1..N-1 as
worker processes that rank 0 (the engine, in the agent or server process) starts and stops.

Start (:class:`Followers`): rank 0 checks that N divides the decoder's heads, KV heads and
MLP width and that there are N devices (``cuda:i .. cuda:i+N-1`` from the configured one; on
the CPU every rank uses the CPU), opens a ``TCPStore`` on a free loopback port and spawns the
followers (``torch.multiprocessing``, spawn). Each builds its decoder shard on its device
(from the checkpoint, or the same random weights as world 1:
:mod:`realtime.models.step_audio.sharded`) while rank 0 builds its own; then all join the
process group (NCCL on CUDA, gloo on the CPU) and each follower reports its weight bytes and
free memory. Rank 0 sizes the KV pool for the rank with the least free memory (every rank
holds the same pages of its own KV heads), sends the plan, and each follower builds the same
paged cache and :class:`DecodeRunner`, then repeats rank 0's calls
(:mod:`realtime.models.tp_runner`).

Stop: :meth:`Followers.close` (the engine's ``close``) tells them to leave, waits, then kills
what is left. A follower whose rank 0 dies (killed, crashed) exits at once: a thread waits on
its parent's sentinel. Rank 0 watches its followers the same way: a follower that dies while
the engine runs leaves the decoder without a shard, and rank 0's next collective would wait
for ever, so rank 0 logs it and ends the process (``on_lost``, replaceable in tests).
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing.connection as mpc
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from realtime.config import EngineConfig
from realtime.engine.step_audio.fp8_setup import quantize_decoder
from realtime.models.backend import RunnerOptions
from realtime.models.decode import DecodeRunner
from realtime.models.kv_pages import PagedKVCache
from realtime.models.step_audio.checkpoint import (
    find_checkpoint_files,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from realtime.models.step_audio.config import StepAudioConfig, step_audio_r1_config
from realtime.models.step_audio.sharded import build_follower
from realtime.models.tensor_parallel import local_config, set_group
from realtime.models.tp_runner import Leader, follow

log = logging.getLogger(__name__)
GIB = 1024**3
SPAWN_HINT = (
    " (its error is above; a script that builds the engine at import needs "
    "`if __name__ == '__main__':`, since each rank imports the main module again)"
)
START_TIMEOUT_S = 900.0  # a follower's load (a 33B checkpoint from a slow disk)


@dataclass(frozen=True)
class RankMemory:
    """A rank's weights and the device memory left after them."""

    rank: int
    device: str
    weight_bytes: int
    free: int  # 0 on the CPU
    total: int


def model_config(cfg: EngineConfig) -> StepAudioConfig:
    """The whole model's config: the checkpoint's ``config.json``, or Step-Audio-R1's shapes
    for ``step-audio-random``."""
    if cfg.backend == "step-audio-random":
        return step_audio_r1_config()
    root = resolve_model_path(cfg.model, cfg.cache_dir)
    return StepAudioConfig.from_file(find_checkpoint_files(root).config)


def model_dtype(cfg: EngineConfig, device: torch.device) -> torch.dtype:
    if cfg.backend == "step-audio-random":
        return torch.bfloat16 if cfg.dtype in ("auto", "bfloat16") else getattr(torch, cfg.dtype)
    return resolve_dtype(None if cfg.dtype == "auto" else cfg.dtype, device)


def rank_devices(cfg: EngineConfig, world: int) -> list[torch.device]:
    """Each rank's device; ValueError if there are not ``world`` GPUs from the configured one."""
    dev = resolve_device(cfg.device)
    if dev.type == "cpu":
        return [dev] * world
    if dev.type != "cuda":
        raise ValueError(
            f"engine.tensor_parallel runs on CUDA GPUs (NCCL) or the CPU (gloo), not {dev.type}"
        )
    first, have = dev.index or 0, torch.cuda.device_count()
    if first + world > have:
        raise ValueError(
            f"engine.tensor_parallel {world} needs {world} GPUs from cuda:{first}, "
            f"this machine has {have}"
        )
    return [torch.device("cuda", first + r) for r in range(world)]


def check_world(cfg: EngineConfig, model: StepAudioConfig) -> list[torch.device]:
    """A clear error for a world size the model or the machine cannot take; the devices."""
    world = cfg.tensor_parallel
    if world < 1:
        raise ValueError(f"engine.tensor_parallel must be 1 or more, not {world}")
    try:
        local_config(model.text, world)
    except ValueError as exc:
        raise ValueError(f"engine.tensor_parallel {world}: {exc}") from None
    return rank_devices(cfg, world)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _join_group(store: Any, rank: int, world: int, device: torch.device, timeout_s: float) -> None:
    import torch.distributed as dist

    kw: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        _backend(device),
        store=store,
        rank=rank,
        world_size=world,
        timeout=dt.timedelta(seconds=timeout_s),
        **kw,
    )
    set_group(dist.group.WORLD)


def _leave_group(timeout_s: float | None = None) -> None:
    """Destroy this process's group. Every rank must do it at about the same time: NCCL's
    teardown waits for the peers' (on the H100s rank 0 waiting for a follower to exit before
    destroying its own group hung both). With ``timeout_s`` it runs on a daemon thread and is
    given up after that long (logged), so that closing never hangs."""
    import torch.distributed as dist

    set_group(None)
    if not dist.is_initialized():
        return
    if timeout_s is None:
        dist.destroy_process_group()
        return
    t = threading.Thread(target=dist.destroy_process_group, name="tp-leave", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning(
            "tensor parallel: the process group's teardown took over %.0f s; left", timeout_s
        )


class Followers:
    """Rank 0's handle on ranks 1..N-1 (see the module doc)."""

    def __init__(
        self,
        cfg: EngineConfig,
        devices: list[torch.device],
        timeout_s: float = 300.0,
        on_lost: Callable[[int, int | None], None] | None = None,
    ) -> None:
        """Spawn the followers (they start loading at once). ``timeout_s``: the process
        group's collective timeout; ``on_lost(rank, exitcode)``: a follower died while the
        engine runs (default: log and end this process)."""
        import torch.distributed as dist
        import torch.multiprocessing as mp

        self.world = len(devices)
        self.devices = devices
        self.timeout_s = timeout_s
        self.on_lost = on_lost or _exit_lost
        self._closing = False
        self.leader: Leader | None = None
        self.memory: list[RankMemory] = []
        self._store = dist.TCPStore(
            "127.0.0.1", 0, self.world, True,
            timeout=dt.timedelta(seconds=timeout_s), wait_for_workers=False,
        )  # fmt: skip
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(1, self.world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=follower_main,
                args=(rank, self.world, cfg, str(devices[rank]), self._store.port, theirs),
                kwargs={"timeout_s": timeout_s},
                name=f"tp-rank{rank}",
                daemon=True,  # ended with this process at the latest
            )
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)
        log.info("tensor parallel: %d follower processes started", len(self.procs))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _receive(self, kind: str, timeout_s: float) -> list[Any]:
        """Each follower's next message, which must be ``kind``; a follower that fails or dies
        meanwhile raises RuntimeError naming it."""
        out = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
            deadline = time.monotonic() + timeout_s
            while not conn.poll(0.2):
                if not proc.is_alive():
                    raise RuntimeError(
                        f"tensor parallel rank {rank} exited (code {proc.exitcode}) during start"
                        f"{SPAWN_HINT}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor parallel rank {rank}: no {kind!r} in {timeout_s} s")
            try:
                got, payload = conn.recv()
            except EOFError:
                raise RuntimeError(
                    f"tensor parallel rank {rank} exited during start{SPAWN_HINT}"
                ) from None
            if got == "error":
                raise RuntimeError(f"tensor parallel rank {rank} failed to start:\n{payload}")
            if got != kind:
                raise RuntimeError(f"tensor parallel rank {rank}: {got!r} where {kind!r} was due")
            out.append(payload)
        return out

    def join(self, rank0: RankMemory) -> None:
        """Wait for the followers' shards (rank 0 has built its own: ``rank0``), then join the
        process group with them."""
        self._receive("loaded", START_TIMEOUT_S)
        _join_group(self._store, 0, self.world, self.devices[0], self.timeout_s)
        # measured after joining: NCCL's buffers are allocated by then
        self.memory = [rank0, *self._receive("joined", START_TIMEOUT_S)]

    def start_runners(
        self,
        plan: tuple[int, int, int],
        opts: RunnerOptions,
        runner: DecodeRunner,
        cache: PagedKVCache,
        check: bool = False,
    ) -> Leader:
        """Send the KV plan (sequences, pages, page size) and runner options; once every
        follower has built its cache and runner, the :class:`Leader` that mirrors the calls
        on rank 0's ``runner`` and ``cache`` (``check``: compare the ranks after each)."""
        for conn in self.conns:
            conn.send(("plan", (plan, opts, check)))
        self._receive("ready", START_TIMEOUT_S)
        self.leader = Leader(self.conns, self.devices[0], runner, cache, check)
        threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()
        return self.leader

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, 1)}
        ready = mpc.wait(list(sentinels))
        if self._closing:
            return
        rank = sentinels[ready[0]]  # type: ignore[index]
        proc = self.procs[rank - 1]
        proc.join(1.0)  # reaped: its exit code
        self.on_lost(rank, proc.exitcode)

    def stats(self) -> list[dict[str, Any]]:
        assert self.leader is not None
        return self.leader.stats()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the followers (idempotent): they leave their loop and exit; any still there
        after ``timeout_s`` is killed. Rank 0 leaves the process group."""
        if self._closing:
            return
        self._closing = True
        if self.leader is not None:
            self.leader.close()
        else:
            for conn in self.conns:
                conn.close()  # a follower still starting sees EOF (or its parent's end)
        deadline = time.monotonic() + timeout_s
        _leave_group(timeout_s)  # with the followers, which leave it as they stop
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                log.warning("tensor parallel: %s did not exit; killing it", proc.name)
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        log.info("tensor parallel: followers stopped")


def _exit_lost(rank: int, exitcode: int | None) -> None:
    log.critical(
        "tensor parallel rank %d died (exit code %s): the decoder has lost a shard and cannot "
        "run; ending this process",
        rank,
        exitcode,
    )
    logging.shutdown()
    os._exit(70)


def _exit_with_parent() -> None:
    """End this process as soon as its parent (rank 0) is gone, whatever it is doing (it may
    be waiting in a collective that will never complete)."""
    import multiprocessing as mp

    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mpc.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def follower_main(
    rank: int,
    world: int,
    cfg: EngineConfig,
    device: str,
    port: int,
    conn: Connection,
    timeout_s: float = 300.0,
) -> None:
    """A follower process: build the decoder shard, join the group, build the cache and runner
    of rank 0's plan, then repeat rank 0's calls until it closes."""
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(message)s")
    _exit_with_parent()
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(max(1, cfg.threads))
        mcfg, dtype = model_config(cfg), model_dtype(cfg, dev)
        root = (
            None
            if cfg.backend == "step-audio-random"
            else resolve_model_path(cfg.model, cfg.cache_dir)
        )
        decoder = build_follower(mcfg, rank, world, dev, dtype, root)
        if cfg.weights == "fp8":
            quantize_decoder(decoder, cfg)
        conn.send(("loaded", None))
        store = dist.TCPStore(
            "127.0.0.1", port, world, False, timeout=dt.timedelta(seconds=timeout_s)
        )
        _join_group(store, rank, world, dev, timeout_s)
        free, total = torch.cuda.mem_get_info(dev) if dev.type == "cuda" else (0, 0)
        conn.send(("joined", RankMemory(rank, device, decoder.weight_bytes(), free, total)))
        _, ((sequences, pages, page_size), opts, check) = conn.recv()
        cache = PagedKVCache(
            decoder.cfg, sequences, cfg.max_context, dev, dtype,
            page_size=page_size, num_pages=pages,
        )  # fmt: skip
        runner = DecodeRunner(decoder, cache, opts)
        conn.send(("ready", None))
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        return
    try:
        follow(conn, runner, cache, check)
    finally:
        _leave_group(timeout_s=10.0)  # at the time rank 0 leaves it (see Followers.close)
