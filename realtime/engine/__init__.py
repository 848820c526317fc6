"""Reply engines. ``build_engine`` picks the backend named in the config."""

from __future__ import annotations

from realtime.config import EngineConfig
from realtime.engine.base import Engine


def build_engine(cfg: EngineConfig) -> Engine:
    """Load the configured backend (blocking: call it on the engine's worker thread)."""
    if cfg.tensor_parallel != 1 and cfg.backend not in ("step-audio", "step-audio-random"):
        raise ValueError(
            f"engine.tensor_parallel applies to the Step-Audio engine only, not {cfg.backend!r}"
        )
    if cfg.backend == "smollm2":
        from realtime.engine.smollm import SmolLMEngine

        return SmolLMEngine(cfg)
    if cfg.backend in ("step-audio", "step-audio-random"):
        from realtime.engine.step_audio import build_step_audio_engine

        return build_step_audio_engine(cfg)
    if cfg.backend == "openai-compatible":
        from realtime.engine.openai_compat import OpenAICompatEngine

        return OpenAICompatEngine(cfg)
    raise ValueError(f"unknown engine.backend {cfg.backend!r}")
