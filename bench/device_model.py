"""The H100's measured engine times, imposed on an engine that runs on the CPU.

With the tiny Step-Audio checkpoint on the CPU, the server's whole path (VAD, listening, the
scheduler, the worker, the speaking fork, TTS, the socket) runs as it does on the GPU machine,
but each piece of device work takes a few milliseconds instead of the tens that the full-size
model takes on an H100. :func:`install` makes each of them last as long as it does there: after
the real work, the engine thread sleeps for the rest of the modelled time (a sleep lets the
other threads run, as a wait for the GPU does). That shows, on a machine without a GPU, what the
scheduling does once callers queue for the device.

The times are engine-only figures measured on one H100 with random full-size weights (bf16):
- decode step: 24.3 ms at every batch size up to 32 (the table in issue 11), 25.2 ms at 64
  (and so for a step whose free rows carry pre-fill pieces, counting their rows: an
  assumption, not yet measured);
- batched pre-fill pass: 28.7 ms for one 8-position piece, 39.5 ms for 32 of them
  (``bench/results/gpu-prefill-batch.json``), so 28.5 ms + 0.043 ms a position;
- audio encoder + adapter as CUDA graphs (``engine.encoder_graphs``): 2.80 ms for 0.64 s,
  4.42 ms for 10.24 s, 8.05 ms for 24.96 s (``bench/results/gpu-encoder.json``), so 2.66 ms +
  0.216 ms per second of audio. (Eager it was 12-16 ms a call on an idle machine, bound by its
  launches, and more under load: the earlier 3 ms + 0.63 ms/s was too low for it.)

Every figure a run with this model gives is *emulated*: it says what the scheduling does with
these times, not what the GPU does. Label it so wherever it is quoted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceModel:
    step_ms: float = 24.3  # a decode step, batch <= 32
    step_ms_64: float = 25.2  # a decode step at batch 64 and above
    pass_ms: float = 28.5  # a pre-fill pass: fixed part
    pass_ms_per_position: float = 0.043
    encoder_ms: float = 2.66  # the audio encoder + adapter (CUDA graphs): fixed part
    encoder_ms_per_s: float = 0.216

    def step(self, lanes: int) -> float:
        return self.step_ms if lanes <= 32 else self.step_ms_64

    def prefill(self, positions: int) -> float:
        return self.pass_ms + self.pass_ms_per_position * positions

    def encoder(self, samples: int) -> float:
        return self.encoder_ms + self.encoder_ms_per_s * samples / 16000


MODELS = {"h100-bf16": DeviceModel()}


def _lasting(fn: Callable[..., Any], ms: Callable[..., float]) -> Callable[..., Any]:
    """``fn`` made to last at least ``ms(*args)`` milliseconds."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        rest = ms(*args, **kwargs) / 1e3 - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        return out

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def install(name: str) -> Callable[[], None]:
    """Make the engine's device work last as long as ``MODELS[name]`` says (this process);
    returns the function that puts the engine back as it was."""
    from realtime.engine.step_audio.core import StepAudioCore
    from realtime.models.decode import DecodeRunner

    model = MODELS[name]
    originals = [
        (  # every step (``step`` is ``step_riding`` without riders): lanes and riders' rows
            DecodeRunner,
            "step_riding",
            lambda runner, riders: model.step(
                len(runner.lanes) + sum(len(r.embeds) for r in riders)
            ),
        ),
        (DecodeRunner, "prefill_batch", lambda runner, embeds, *a, **k: model.prefill(len(embeds))),
        (StepAudioCore, "encode", lambda core, pcm: model.encoder(len(pcm))),
    ]
    saved = [(cls, attr, getattr(cls, attr)) for cls, attr, _ in originals]
    for cls, attr, ms in originals:
        setattr(cls, attr, _lasting(getattr(cls, attr), ms))

    def undo() -> None:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)

    return undo
