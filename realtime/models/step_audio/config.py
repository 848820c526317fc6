"""Typed view of a Step-Audio-R1 / Step-Audio 2 ``config.json``.

The checkpoint's ``config.json`` holds the decoder shape under ``text_config`` and the audio
side under ``audio_encoder_config``. A few published Step-Audio 2 configs write the decoder keys
at the top level instead of under ``text_config`` (the public remote code accepts both), so the
top level is used as the text config when ``text_config`` is absent. A missing key is an error
that names the key and the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from realtime.models.qwen2 import Qwen2Config

ARCHITECTURES = ("StepAudioForCausalLMV2", "StepAudio2ForCausalLM")
MODEL_TYPES = ("step_audio_qwen2", "step_audio_2")


class CheckpointError(ValueError):
    """A checkpoint directory or its config is wrong; the message names what and where."""


@dataclass(frozen=True)
class AudioEncoderConfig:
    n_mels: int = 128
    n_audio_ctx: int = 1500
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 32
    llm_dim: int = 5120
    kernel_size: int = 3
    adapter_stride: int = 2


@dataclass(frozen=True)
class StepAudioConfig:
    architectures: tuple[str, ...]
    model_type: str
    text: Qwen2Config  # the decoder's shape (Qwen2.5: q/k/v bias on)
    audio: AudioEncoderConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> StepAudioConfig:
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: the top level must be a JSON object")
        arch = tuple(d.get("architectures") or ())
        model_type = str(d.get("model_type", ""))
        if not any(a in ARCHITECTURES for a in arch) and model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"{source}: not a Step-Audio checkpoint (architectures={list(arch)}, "
                f"model_type={model_type!r}; expected one of {list(ARCHITECTURES)} "
                f"or model_type in {list(MODEL_TYPES)})"
            )
        text_src = "text_config"
        text = d.get("text_config")
        if text is None:
            if "hidden_size" not in d:
                raise CheckpointError(f"{source}: missing config key 'text_config'")
            text, text_src = d, "(top level)"
        if "audio_encoder_config" not in d:
            raise CheckpointError(f"{source}: missing config key 'audio_encoder_config'")
        t = _text_config(text, f"{source}: {text_src}")
        a = _audio_config(d["audio_encoder_config"], f"{source}: audio_encoder_config")
        if a.llm_dim != t.hidden_size:
            raise CheckpointError(
                f"{source}: audio_encoder_config.llm_dim={a.llm_dim} does not match "
                f"text_config.hidden_size={t.hidden_size}"
            )
        return cls(architectures=arch, model_type=model_type, text=t, audio=a)

    @classmethod
    def from_file(cls, path: str | Path) -> StepAudioConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"missing file {path.name} in {path.parent}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` layout (what :func:`from_dict` reads back)."""
        return {
            "architectures": list(self.architectures),
            "model_type": self.model_type,
            "torch_dtype": "bfloat16",
            "text_config": asdict(self.text),
            "audio_encoder_config": asdict(self.audio),
        }


def _require(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise CheckpointError(f"{where}: missing config key '{key}'")
    return d[key]


def _text_config(d: Any, where: str) -> Qwen2Config:
    kv = (
        d.get("num_key_value_heads", d.get("num_attention_groups")) if isinstance(d, dict) else None
    )
    if kv is None:
        _require(d, "num_key_value_heads", where)
    rope = d.get("rope_theta")
    if rope is None:
        rope = (d.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
    cfg = Qwen2Config(
        hidden_size=int(_require(d, "hidden_size", where)),
        intermediate_size=int(_require(d, "intermediate_size", where)),
        num_hidden_layers=int(_require(d, "num_hidden_layers", where)),
        num_attention_heads=int(_require(d, "num_attention_heads", where)),
        num_key_value_heads=int(kv),
        vocab_size=int(_require(d, "vocab_size", where)),
        rope_theta=float(rope),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 65536)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    if (
        cfg.hidden_size % cfg.num_attention_heads
        or cfg.num_attention_heads % cfg.num_key_value_heads
    ):
        raise CheckpointError(
            f"{where}: hidden_size {cfg.hidden_size}, num_attention_heads "
            f"{cfg.num_attention_heads} and num_key_value_heads {cfg.num_key_value_heads} "
            "do not divide"
        )
    return cfg


def _audio_config(d: Any, where: str) -> AudioEncoderConfig:
    names = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "llm_dim")
    values = {k: int(_require(d, k, where)) for k in names}
    cfg = AudioEncoderConfig(
        **values,
        kernel_size=int(d.get("kernel_size", 3)),
        adapter_stride=int(d.get("adapter_stride", 2)),
    )
    if cfg.n_audio_state % cfg.n_audio_head:
        raise CheckpointError(f"{where}: n_audio_state is not a multiple of n_audio_head")
    return cfg


def step_audio_r1_config() -> StepAudioConfig:
    """The full Step-Audio-R1 shape (Qwen2.5-32B decoder, 32-layer Whisper-large encoder)."""
    return StepAudioConfig(
        architectures=("StepAudioForCausalLMV2",),
        model_type="step_audio_qwen2",
        text=Qwen2Config(
            hidden_size=5120,
            intermediate_size=27648,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            vocab_size=158720,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=65536,
        ),
        audio=AudioEncoderConfig(llm_dim=5120),
    )
