"""Smart Turn v3: a classifier of the audio that says whether the speaker has finished their
turn (BSD-2, pipecat-ai/smart-turn). A Whisper-tiny encoder with a small head, int8 ONNX of
about 8 MB; it reads the last 8 s of the turn (16 kHz mono, trailing silence included) as
Whisper log-mel features and returns the probability that the turn is complete.

The ONNX file ships inside the ``pipecat-ai`` wheel, installed with ``--no-deps`` for the file
alone (see the Makefile); it is found through the installed distribution's file list, so the
``pipecat`` package itself is never imported. Inference is synchronous and takes ~10-60 ms on
a CPU: callers run it off the event loop (``realtime/endpoint.py`` uses its own thread).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import threading
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

RATE = 16000
N_FFT, HOP = 400, 160  # Whisper's 25 ms window, 10 ms hop
WINDOW_S = 8  # the model reads the last 8 s; shorter audio is zero-padded in front
DISTRIBUTION = "pipecat-ai"
MODEL_GLOB = "smart-turn-v3*.onnx"
ENV_PATH = "REALTIME_AGENT_SMART_TURN"  # an explicit .onnx path wins over the wheel's


class TurnModelMissing(RuntimeError):
    """The Smart Turn ONNX file is not installed."""


def find_model() -> Path:
    """The Smart Turn v3 ONNX file: ``$REALTIME_AGENT_SMART_TURN``, else the newest one in the
    installed ``pipecat-ai`` wheel."""
    explicit = os.environ.get(ENV_PATH)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise TurnModelMissing(f"{ENV_PATH}={explicit} is not a file")
        return path
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise TurnModelMissing(
            "the Smart Turn model ships in the pipecat-ai wheel: "
            "pip install --no-deps pipecat-ai (make install does), or set vad.end_of_turn.mode "
            "to 'silence'"
        ) from None
    found = sorted(
        Path(str(dist.locate_file(f)))
        for f in dist.files or ()
        if Path(str(f)).match(MODEL_GLOB) and "smart_turn" in str(f)
    )
    found = [p for p in found if p.is_file()]
    if not found:
        raise TurnModelMissing(f"no {MODEL_GLOB} in the installed {DISTRIBUTION} wheel")
    return found[-1]


class SmartTurn:
    """One loaded model. ``probability`` is thread-safe (one inference at a time)."""

    def __init__(self, path: Path | None = None, threads: int = 1) -> None:
        import onnxruntime as ort
        from transformers import WhisperFeatureExtractor

        self.path = path or find_model()
        opts = ort.SessionOptions()
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(self.path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        # Whisper's mel filter bank (80 bins), from its feature extractor
        self._mel = WhisperFeatureExtractor(chunk_length=WINDOW_S).mel_filters.astype(np.float64)
        self._window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window
        self._lock = threading.Lock()

    def features(self, pcm16k: np.ndarray) -> np.ndarray:
        """Whisper log-mel features (1, 80, 800) of the last 8 s (zero-padded in front), as
        ``WhisperFeatureExtractor(chunk_length=8)(..., do_normalize=True)`` computes them, in
        numpy: its torch path takes its threads from the whole process's pool, which a busy
        engine holds (400 ms instead of 10 on two loaded cores)."""
        x = np.asarray(pcm16k, dtype=np.float32).reshape(-1)
        n = RATE * WINDOW_S
        x = x[-n:] if x.size >= n else np.pad(x, (n - x.size, 0))
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        frames = sliding_window_view(
            np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect"), N_FFT
        )
        power = np.abs(np.fft.rfft(frames[::HOP] * self._window, axis=-1)) ** 2
        log_mel = np.log10(np.maximum(power[:-1] @ self._mel, 1e-10))
        log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
        return ((log_mel + 4.0) / 4.0).T[None].astype(np.float32)

    def probability(self, pcm16k: np.ndarray) -> float:
        """P(the turn is complete) for float32 16 kHz mono audio ending now."""
        feats = self.features(pcm16k)
        with self._lock:
            out = self._session.run(None, {self._input: feats})
        return float(np.asarray(out[0]).reshape(-1)[0])


@functools.lru_cache(maxsize=1)
def shared_model() -> SmartTurn:
    """The process's one Smart Turn model (loaded on first use, ~0.2 s)."""
    return SmartTurn()
