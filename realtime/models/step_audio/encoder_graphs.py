"""The audio path (front end, encoder, adapter) as CUDA graphs, one per length bucket.

Eager, one encoding is several hundred kernel launches from Python, and the front end used to
copy the audio to the device and read a mask back, each a wait for the whole queue of decode
steps. Under load the engine thread, sharing the interpreter with the server, launches them
far slower than the GPU runs them: on one H100 with 32 callers the encoder held 40% of the
device's time (``docs/benchmarks.md``). A graph is one launch and nothing is read back.

Audio is padded with zeros to the next multiple of :data:`BUCKET_SAMPLES` (640 ms, listening's
chunk, so the growing windows fill their buckets exactly) and that bucket's graph runs. The
encoder zeroes or masks everything computed from the padding (``AudioEncoder.forward`` with
``frames``); the front end needs nothing: its frames past the piece's cover only zeros, so
they hold the log floor and never raise the maximum it normalises by. A padded run equals an
unpadded one up to kernel rounding.

Without CUDA (tests) :meth:`EncoderGraphs.encode` runs the same padded computation eagerly.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from realtime.models.step_audio.frontend import normalize_log_mel
from realtime.models.step_audio.lengths import (
    CHUNK_SAMPLES,
    HOP,
    PAD_SAMPLES,
    embeddings_for_samples,
)
from realtime.models.step_audio.model import StepAudioModel

log = logging.getLogger(__name__)

BUCKET_SAMPLES = 10240  # 640 ms at 16 kHz
MIN_BUCKET_SAMPLES = 3200  # 200 ms: a shorter listening chunk still gets buckets this long


class EncoderGraphs:
    """Fixed-shape encodings of pieces of up to ``max_samples`` (default 25 s)."""

    def __init__(
        self,
        model: StepAudioModel,
        max_samples: int = CHUNK_SAMPLES,
        bucket: int = BUCKET_SAMPLES,
    ) -> None:
        self.model = model
        self.bucket = bucket
        self.max_samples = -(-max_samples // bucket) * bucket
        dev = model.device
        # the graphs' inputs: the audio, zero past its length, and that length
        self.pcm = torch.zeros(self.max_samples, device=dev, dtype=torch.float32)
        self.n = torch.zeros((), device=dev, dtype=torch.long)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def sizes(self) -> list[int]:
        return list(range(self.bucket, self.max_samples + 1, self.bucket))

    def _forward(self, size: int) -> torch.Tensor:
        """Embeddings ``[1, N, llm_dim]`` of the first :attr:`n` samples of :attr:`pcm`, run
        over ``size`` samples (the rest is zero); only the first
        ``embeddings_for_samples(n)`` rows are the piece's."""
        m = self.model
        frames = (self.n + PAD_SAMPLES) // HOP
        mel = normalize_log_mel(m.logmel.raw(self.pcm[:size]))
        states, _ = m.encoder(mel.to(m.dtype)[None], frames=frames[None])
        return m.adapter(states)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's graph (largest first, in one memory pool: the graphs run one
        at a time and each output is copied out at once)."""
        if self.model.device.type != "cuda":
            raise RuntimeError("CUDA graphs of the encoder need a CUDA device")
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for size in reversed(self.sizes):
            self.pcm.zero_()
            self.n.fill_(size)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(size)  # lazy initialisation outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(size)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize()
        log.info(
            "audio encoder: %d CUDA graphs (every %d ms up to %.0f s) in %.1f s",
            len(self.graphs), 1000 * self.bucket // 16000, self.max_samples / 16000,
            time.perf_counter() - t0,
        )  # fmt: skip

    @torch.inference_mode()
    def encode(self, pcm: np.ndarray) -> torch.Tensor | None:
        """Embeddings ``[N, llm_dim]`` of one piece of 16 kHz float audio; ``None`` when it
        is longer than the largest bucket (the caller encodes it eagerly)."""
        n = int(pcm.shape[0])
        if n > self.max_samples:
            return None
        count = embeddings_for_samples(n)
        size = max(-(-n // self.bucket), 1) * self.bucket
        src = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))
        if self.pcm.is_cuda:
            src = src.pin_memory()  # copied without waiting for the queued work
        self.pcm[:n].copy_(src, non_blocking=True)
        self.pcm[n:size].zero_()
        self.n.fill_(n)
        if size in self.graphs:
            graph, out = self.graphs[size]
            graph.replay()
        else:
            out = self._forward(size)
        # the pool is shared: the next replay may overwrite this output
        return out[0, :count].clone()
