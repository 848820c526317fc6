"""``engine.weights: fp8`` at load: the decoder's projections in FP8, and the two faster
options of ``realtime/models/fp8.py`` when the config asks for them:

* ``engine.fp8_lm_head``: ``lm_head`` in FP8 too (half the bytes of the largest single
  matrix read at every step);
* ``engine.fp8_activations: static``: one activation scale per projection, calibrated here
  once on a short conversation (a system prompt, a second of synthetic audio through the
  audio encoder, a typed question), instead of an ``amax`` reduction per projection per step.
  Inputs larger than twice what calibration saw are clipped: measure the cost on real
  weights before serving with it (``bench/fp8_error.py`` measures it on SmolLM2).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from realtime.config import EngineConfig
from realtime.models.fp8 import calibrate_activations_, quantize_decoder_, quantize_lm_head_
from realtime.models.qwen2 import KVCache, Qwen2ForCausalLM
from realtime.models.step_audio.model import StepAudioModel
from realtime.models.step_audio.prompt import Message, PromptBuilder, audio_slots

log = logging.getLogger(__name__)

GIB = 1024**3
CALIBRATION_QUESTION = (
    "Could you book a table for four tomorrow at seven, somewhere quiet near the station, "
    "and remind me to call my sister about the train tickets?"
)
CALIBRATION_AUDIO_S = 1.0


def check_fp8_options(cfg: EngineConfig) -> None:
    """The FP8 options' combinations that cannot work, as a clear error before loading."""
    extras = cfg.fp8_lm_head or cfg.fp8_activations != "dynamic"
    if extras and cfg.weights != "fp8":
        raise ValueError("engine.fp8_lm_head / engine.fp8_activations need engine.weights: fp8")
    if cfg.fp8_activations == "static" and cfg.tensor_parallel > 1:
        raise ValueError(
            "engine.fp8_activations: static is calibrated on one rank only: it needs "
            "engine.tensor_parallel: 1"
        )


def quantize_decoder(decoder: Qwen2ForCausalLM, cfg: EngineConfig) -> int:
    """The decoder's layers (and ``lm_head`` with ``fp8_lm_head``) to FP8; bytes saved."""
    saved = quantize_decoder_(decoder)
    if cfg.fp8_lm_head:
        saved += quantize_lm_head_(decoder)
    return saved


@torch.no_grad()
def calibrate_static_scales(
    model: StepAudioModel, builder: PromptBuilder, system_prompt: str
) -> dict[str, float]:
    """Static activation scales from one eager pass of a short conversation (with audio)."""
    n = int(CALIBRATION_AUDIO_S * 16000)
    t = np.arange(n, dtype=np.float32) / 16000
    rng = np.random.default_rng(0)
    # a gliding tone with noise: speech-like levels, no recording needed
    audio = 0.3 * np.sin(2 * np.pi * (150 + 200 * t) * t) + 0.05 * rng.standard_normal(n)
    audio_embeds = model.encode_audio(audio.astype(np.float32))
    user = Message("human", (*audio_slots(n), CALIBRATION_QUESTION))
    prompt = builder.render([Message.text("system", system_prompt), user])
    ids = torch.tensor(prompt.ids, device=model.device)
    embeds = model.embed(ids, audio_embeds)[None]
    dec = model.decoder
    cache = KVCache(dec.cfg, 1, len(prompt.ids) + 1, model.device, model.dtype)
    slots = torch.tensor(cache.allocate(1), device=model.device)
    positions = torch.arange(len(prompt.ids), device=model.device)[None]
    seen = calibrate_activations_(dec, lambda: dec(embeds, positions, cache, slots))
    log.info(
        "FP8 static activation scales calibrated on %d positions (largest input %.3g)",
        len(prompt.ids), max(seen.values()),
    )  # fmt: skip
    return seen


def prepare_fp8(model: StepAudioModel, cfg: EngineConfig, builder: PromptBuilder) -> None:
    """Rank 0's FP8 set-up: quantise (a no-op when done already), calibrate if asked."""
    saved = quantize_decoder(model.decoder, cfg)
    if saved:
        log.info("decoder weights quantised to FP8 e4m3: %.1f GiB saved", saved / GIB)
    if cfg.fp8_activations == "static":
        calibrate_static_scales(model, builder, cfg.system_prompt)
