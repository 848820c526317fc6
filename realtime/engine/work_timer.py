"""How long the engine's device work takes, by kind: decode steps, pre-fill passes and the audio
encoder. ``/metrics`` shows the totals (``agent_engine{stat="gpu_ms_..."}``) and ``bench/load.py``
turns them into each kind's share of a load level's wall time: where the GPU's time goes once
callers queue for it.

On CUDA each piece of work is timed by two events on the stream, read once the GPU has passed
them (``collect``, on the engine thread, never waiting); elsewhere by the wall clock around it
(the work is synchronous there). A kind's time includes any wait inside it for the host to
launch the rest of it, which is also time the device spends on that kind.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch

KINDS = ("decode_step", "prefill_pass", "audio_encoder")
MAX_PENDING = 4096  # events not yet passed by the GPU; beyond this the oldest are not counted


class WorkTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        # every kind's entry exists from the start: readers on other threads copy these dicts
        # while the engine thread updates them, which is safe while no key is added
        self.ms: dict[str, float] = dict.fromkeys(KINDS, 0.0)
        self.runs: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._pending: deque[tuple[str, torch.cuda.Event, torch.cuda.Event]] = deque()

    @contextmanager
    def track(self, kind: str) -> Iterator[None]:
        """Time the device work queued inside the block as ``kind`` (one of :data:`KINDS`)."""
        if kind not in self.ms:
            raise ValueError(f"unknown kind of engine work {kind!r}: one of {KINDS}")
        if not self.cuda:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._add(kind, 1e3 * (time.perf_counter() - t0))
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
            self._pending.append((kind, start, end))
            self.collect()

    def collect(self) -> None:
        """Add the work the GPU has finished (engine thread; never waits)."""
        while self._pending and self._pending[0][2].query():
            kind, start, end = self._pending.popleft()
            self._add(kind, start.elapsed_time(end))

    def _add(self, kind: str, ms: float) -> None:
        self.ms[kind] += ms
        self.runs[kind] += 1

    def stats(self) -> dict[str, int]:
        """Totals so far: ``gpu_ms_<kind>`` (milliseconds) and ``<kind>_runs``."""
        out = {f"gpu_ms_{k}": int(v) for k, v in dict(self.ms).items()}
        out.update({f"{k}_runs": n for k, n in dict(self.runs).items()})
        return out
