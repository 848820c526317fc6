"""The Step-Audio engine: the shared model, cache and runner (:class:`StepAudioCore`) and its
sessions, and :func:`build_step_audio_engine` for the ``step-audio`` and ``step-audio-random``
backends."""

from __future__ import annotations

import logging
import weakref
from typing import Literal

import numpy as np
import torch

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.step_audio.core import StepAudioCore, StepAudioOptions
from realtime.engine.step_audio.fp8_setup import check_fp8_options, quantize_decoder
from realtime.engine.step_audio.ranks import (
    Followers,
    RankMemory,
    check_world,
    model_config,
    model_dtype,
)
from realtime.engine.step_audio.session import StepAudioSession
from realtime.models.step_audio.config import step_audio_r1_config
from realtime.models.step_audio.encoder_graphs import MIN_BUCKET_SAMPLES, EncoderGraphs
from realtime.models.step_audio.lengths import CHUNK_SAMPLES
from realtime.models.step_audio.sharded import build_rank0
from realtime.models.step_audio.tokens import SpecialTokens

log = logging.getLogger(__name__)

__all__ = ["StepAudioEngine", "StepAudioOptions", "build_step_audio_engine"]


class StepAudioEngine(StepAudioCore):
    input_kind: Literal["text", "audio"] = "audio"
    # sessions' answers advance in turn and share each batched step (scheduler.py)
    interleaved_responses = True

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> StepAudioSession:
        return StepAudioSession(self, system_prompt, sampling)

    @torch.inference_mode()
    def warmup(self) -> None:
        """Capture the step and pre-fill graphs and the encoder's (or run it once)."""
        self.runner.capture_all()
        if self.cfg.cuda_graphs and self.cfg.encoder_graphs and self.device.type == "cuda":
            bucket = min(max(self.chunk_samples, MIN_BUCKET_SAMPLES), CHUNK_SAMPLES)
            graphs = EncoderGraphs(self.model, bucket=bucket)
            try:
                graphs.capture()
                self.encoder_graphs = graphs
            except RuntimeError as exc:  # the eager encoder computes the same, only slower
                log.warning("audio encoder CUDA graphs not captured (%s): running it eagerly", exc)
        self.encode(np.zeros(self.chunk_samples, dtype=np.float32))
        self.runner.sync()

    def close(self) -> None:
        """Take every lane off; under tensor parallelism, stop the other ranks (the engine
        cannot run after that)."""
        if self.followers is not None:
            if self.followers.leader is not None and not self.followers.leader.closed:
                self.runner.clear()
            self.followers.close()
        else:
            self.runner.clear()


def build_step_audio_engine(
    cfg: EngineConfig, opts: StepAudioOptions | None = None
) -> StepAudioEngine:
    """``step-audio``: the checkpoint at ``cfg.model``; ``step-audio-random``: full-size random
    bf16 weights on the GPU (benchmarks only: no meaningful words) with a byte-level tokenizer
    (:mod:`realtime.models.step_audio.random_tokenizer`). ``engine.tensor_parallel`` N > 1:
    the decoder split over N ranks, ranks 1.. started here (``ranks.py``)."""
    if cfg.backend not in ("step-audio", "step-audio-random"):
        raise ValueError(f"not a Step-Audio backend: {cfg.backend!r}")
    opts = opts or StepAudioOptions()
    check_fp8_options(cfg)
    if cfg.tensor_parallel == 1:
        return _build(cfg, opts, None)
    devices = check_world(cfg, model_config(cfg))
    followers = Followers(cfg, devices, timeout_s=opts.tp_timeout_s)
    try:
        engine = _build(cfg, opts, followers)
    except BaseException:
        followers.close(timeout_s=2.0)
        raise
    weakref.finalize(engine, followers.close)  # at the latest when the engine is collected
    return engine


def _build(
    cfg: EngineConfig, opts: StepAudioOptions, followers: Followers | None
) -> StepAudioEngine:
    from realtime.models.step_audio.checkpoint import load_step_audio, resolve_device

    world = cfg.tensor_parallel
    if cfg.backend == "step-audio":
        dtype = None if cfg.dtype == "auto" else cfg.dtype
        loaded = load_step_audio(cfg.model, cfg.device, dtype, cache_dir=cfg.cache_dir, world=world)
        model, tok, special, name = loaded.model, loaded.tokenizer, loaded.special, "step-audio"
    else:
        from realtime.models.step_audio.model import random_step_audio
        from realtime.models.step_audio.random_tokenizer import PROMPT_WORDS, random_tokenizer

        dev = resolve_device(cfg.device)
        dtype = model_dtype(cfg, dev)
        if world == 1:
            model = random_step_audio(device=dev, dtype=dtype)
        else:  # shard 0 of the same random weights
            model = build_rank0(step_audio_r1_config(), world, dev, dtype, None)
        # the forced answer's words are one token each, as in a real vocabulary
        words = cfg.forced_answer.split()
        tok = random_tokenizer((*PROMPT_WORDS, *words, *(" " + w for w in words)))
        special = SpecialTokens.from_tokenizer(tok, check_known=True)
        model.audio_patch_id = special.audio_patch
        name = "step-audio-random"
    if followers is not None:
        if cfg.weights == "fp8":  # before the memory report (the core would do it after)
            quantize_decoder(model.decoder, cfg)
        dev = model.device
        free, total = torch.cuda.mem_get_info(dev) if dev.type == "cuda" else (0, 0)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        weights += sum(b.numel() * b.element_size() for b in model.decoder.buffers())
        followers.join(RankMemory(0, str(dev), weights, free, total))
    return StepAudioEngine(model, tok, special, cfg, opts, name=name, followers=followers)
