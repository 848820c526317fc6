"""Semantic end of turn: asks the Smart Turn model (realtime/turn_model.py), on its own thread,
whether the user has finished, from the audio of the turn so far.

The model is loaded once per process on that thread (``warm``); until it is, and whenever it
is missing, fails or answers later than ``model_timeout_ms``, the verdict is None and the
endpointer's silence timer decides. The event loop never waits on the model, only the session
that asked does (for at most ``model_timeout_ms``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from realtime.audio import PIPELINE_RATE
from realtime.config import EndOfTurnConfig
from realtime.turn_model import WINDOW_S, SmartTurn, TurnModelMissing, shared_model

log = logging.getLogger(__name__)

# one thread for every session: the model runs one inference at a time anyway
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-turn")
_loading: Future[SmartTurn] | None = None


def warm() -> Future[SmartTurn]:
    """Start loading the process's model on the model thread (once); returns its future."""
    global _loading
    if _loading is None:
        _loading = _EXECUTOR.submit(shared_model)
    return _loading


def _model_now() -> SmartTurn | None:
    fut = warm()
    if not fut.done():
        return None
    exc = fut.exception()
    if exc is not None:
        if not getattr(_model_now, "warned", False):
            _model_now.warned = True  # type: ignore[attr-defined]
            how = str(exc) if isinstance(exc, TurnModelMissing) else repr(exc)
            log.warning("semantic end of turn off, the silence timer decides: %s", how)
        return None
    return fut.result()


async def ready(timeout_s: float = 60.0) -> SmartTurn:
    """Wait (without blocking the loop) until the model is loaded; raises if it cannot be."""
    return await asyncio.wait_for(asyncio.wrap_future(warm()), timeout_s)


# The Realtime API's semantic_vad eagerness: (P(complete) that ends the turn, longest wait in
# ms after an "incomplete"). auto is medium, the config's tuned threshold.
EAGERNESS = {"low": (0.97, 3000), "high": (0.5, 800)}


def end_of_turn_for(base: EndOfTurnConfig, eagerness: str | None) -> EndOfTurnConfig:
    """The end of turn of a session: ``None`` (server_vad) is the silence timer; an eagerness
    (semantic_vad) the turn model, ``medium``/``auto`` with the config's own settings."""
    if eagerness is None:
        return dataclasses.replace(base, mode="silence")
    threshold, max_wait = EAGERNESS.get(eagerness, (base.threshold, base.max_wait_ms))
    return dataclasses.replace(base, mode="semantic", threshold=threshold, max_wait_ms=max_wait)


class RecentAudio:
    """The user's recent audio (the model's 8 s window plus padding), by stream time."""

    def __init__(self, keep_s: float = WINDOW_S + 1.0) -> None:
        self.keep = int(keep_s * PIPELINE_RATE)
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._n = 0
        self._t_end = 0.0  # stream time after the last sample kept

    def append(self, pcm: np.ndarray, t_start: float) -> None:
        self._chunks.append(pcm)
        self._n += pcm.size
        self._t_end = t_start + pcm.size / PIPELINE_RATE
        while self._chunks and self._n - self._chunks[0].size >= self.keep:
            self._n -= self._chunks.popleft().size

    def since(self, t: float) -> np.ndarray:
        """Audio from stream time ``t`` (clipped to what is kept) to now."""
        if not self._chunks:
            return np.zeros(0, np.float32)
        pcm = np.concatenate(list(self._chunks))
        n = int(round((self._t_end - t) * PIPELINE_RATE))
        return pcm[-n:] if 0 < n < pcm.size else pcm

    def clear(self) -> None:
        self._chunks.clear()
        self._n = 0


class TurnClassifier:
    """One session's use of the shared model."""

    def __init__(self, cfg: EndOfTurnConfig) -> None:
        self.cfg = cfg
        self.last_probability: float | None = None
        self.last_inference_s: float | None = None
        warm()

    async def complete(self, pcm16k: np.ndarray) -> bool | None:
        """Is the turn whose audio is ``pcm16k`` (ending now) complete? None: no answer."""
        model = _model_now()
        if model is None:
            return None
        t0 = time.perf_counter()
        fut = asyncio.wrap_future(_EXECUTOR.submit(model.probability, pcm16k))
        try:
            p = await asyncio.wait_for(fut, self.cfg.model_timeout_ms / 1000)
        except TimeoutError:
            log.warning(
                "turn model slower than %d ms: the silence timer decides", self.cfg.model_timeout_ms
            )
            return None
        except Exception:
            log.exception("turn model failed: the silence timer decides")
            return None
        self.last_probability, self.last_inference_s = p, time.perf_counter() - t0
        return p >= self.cfg.threshold
