"""The Step-Audio engine: the shared model, cache and runner (:class:`StepAudioCore`) and its
sessions, and :func:`build_step_audio_engine` for the ``step-audio`` and ``step-audio-random``
backends."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.step_audio.core import StepAudioCore, StepAudioOptions
from realtime.engine.step_audio.encoding import encode_piece
from realtime.engine.step_audio.session import StepAudioSession
from realtime.models.step_audio.tokens import SpecialTokens

__all__ = ["StepAudioEngine", "StepAudioOptions", "build_step_audio_engine"]


class StepAudioEngine(StepAudioCore):
    input_kind: Literal["text", "audio"] = "audio"
    # sessions' answers advance in turn and share each batched step (scheduler.py)
    interleaved_responses = True

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> StepAudioSession:
        return StepAudioSession(self, system_prompt, sampling)

    @torch.inference_mode()
    def warmup(self) -> None:
        """Capture the step and pre-fill graphs and run the encoder once."""
        self.runner.capture_all()
        encode_piece(self.model, np.zeros(self.chunk_samples, dtype=np.float32))
        self.runner.sync()

    def close(self) -> None:
        self.runner.clear()


def build_step_audio_engine(
    cfg: EngineConfig, opts: StepAudioOptions | None = None
) -> StepAudioEngine:
    """``step-audio``: the checkpoint at ``cfg.model``; ``step-audio-random``: full-size random
    bf16 weights on the GPU (benchmarks only: no meaningful words) with a byte-level tokenizer
    (:mod:`realtime.models.step_audio.random_tokenizer`)."""
    from realtime.models.step_audio.checkpoint import load_step_audio, resolve_device

    if cfg.backend == "step-audio":
        dtype = None if cfg.dtype == "auto" else cfg.dtype
        loaded = load_step_audio(cfg.model, cfg.device, dtype, cache_dir=cfg.cache_dir)
        return StepAudioEngine(loaded.model, loaded.tokenizer, loaded.special, cfg, opts)
    if cfg.backend == "step-audio-random":
        from realtime.models.step_audio.model import random_step_audio
        from realtime.models.step_audio.random_tokenizer import PROMPT_WORDS, random_tokenizer

        dev = resolve_device(cfg.device)
        dtype = torch.bfloat16 if cfg.dtype in ("auto", "bfloat16") else getattr(torch, cfg.dtype)
        model = random_step_audio(device=dev, dtype=dtype)
        # the forced answer's words are one token each, as in a real vocabulary
        words = cfg.forced_answer.split()
        tok = random_tokenizer((*PROMPT_WORDS, *words, *(" " + w for w in words)))
        special = SpecialTokens.from_tokenizer(tok, check_known=True)
        model.audio_patch_id = special.audio_patch
        return StepAudioEngine(model, tok, special, cfg, opts, name="step-audio-random")
    raise ValueError(f"not a Step-Audio backend: {cfg.backend!r}")
