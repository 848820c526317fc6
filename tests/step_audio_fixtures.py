"""A tiny random Step-Audio checkpoint in exactly the real layout, for tests.

Same tensor names and config keys as the real one, several safetensors shards with
``model.safetensors.index.json``, bf16 tensors, a ``generation_config.json`` with the stop ids
Step-Audio-R1 lists (``<|endoftext|>`` 151643 and ``<|EOT|>`` 151665), and a
``tokenizer.json``: the random backend's byte-level BPE
(:mod:`realtime.models.step_audio.random_tokenizer`, special tokens at the real ids) with merges
for the words the tests script. The decoder's ``vocab_size`` is 151700 so those ids exist;
everything else is tiny (width 32, two layers).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from realtime.models.qwen2 import Qwen2Config
from realtime.models.step_audio.config import AudioEncoderConfig, StepAudioConfig
from realtime.models.step_audio.model import StepAudioModel, checkpoint_name, fill_random
from realtime.models.step_audio.random_tokenizer import SPECIAL_TOKEN_IDS, random_tokenizer_json
from realtime.models.step_audio.tokens import EOT, KNOWN_IDS, TextTokenizer

TINY_SPECIAL_TOKENS = SPECIAL_TOKEN_IDS
TINY_WORDS = ("system", "human", "assistant", "hmm", "Hi", "hello", "think", " the", " you")
TINY_VOCAB_SIZE = 151700
R1_STOP_IDS = (151643, 151665)  # Step-Audio-R1's generation_config.json eos_token_id


def tiny_config() -> StepAudioConfig:
    return StepAudioConfig(
        architectures=("StepAudioForCausalLMV2",),
        model_type="step_audio_qwen2",
        text=Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=TINY_VOCAB_SIZE,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
        ),
        audio=AudioEncoderConfig(
            n_mels=128,
            n_audio_ctx=1500,
            n_audio_state=16,
            n_audio_head=2,
            n_audio_layer=2,
            llm_dim=32,
            kernel_size=3,
            adapter_stride=2,
        ),
    )


def tiny_tokenizer_json(words: tuple[str, ...] = ()) -> str:
    """The random backend's byte-level tokenizer with merges for the test words (and
    ``words``: each becomes one token if it is one pre-token)."""
    return random_tokenizer_json(TINY_WORDS + tuple(words))


def tokenizer_config_json() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|EOT|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 65536,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for t, i in TINY_SPECIAL_TOKENS.items()
        },
    }


def _shard_of(name: str) -> int:
    if name.startswith(("encoder.", "adapter.")):
        return 0
    if name.startswith("model.layers."):
        return 1
    return 2  # embed_tokens, norm, lm_head


def write_tiny_checkpoint(
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    modify: Callable[[StepAudioModel, TextTokenizer], None] | None = None,
    stop_ids: tuple[int, ...] | None = R1_STOP_IDS,
    words: tuple[str, ...] = (),
) -> Path:
    """Write a random tiny checkpoint to directory ``path`` (created) and return it.
    ``modify(model, tokenizer)`` may set weights before they are saved; ``stop_ids`` is the
    ``eos_token_id`` of ``generation_config.json`` (``None``: no such file); ``words`` are
    made single tokens (for a ``scripted`` chain that must not repeat a token)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(words))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json(), indent=2))
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if stop_ids is not None:
        gen = {"bos_token_id": 151643, "eos_token_id": list(stop_ids), "do_sample": True}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    torch.manual_seed(seed)
    model = StepAudioModel(cfg).eval().requires_grad_(False)
    fill_random(model, seed, std=0.1)
    if modify is not None:
        modify(model, TextTokenizer.from_dir(path))
    tensors = {
        checkpoint_name(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
    }
    n = 3
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    weight_map: dict[str, str] = {}
    for k, v in tensors.items():
        shards[_shard_of(k)][k] = v
        weight_map[k] = names[_shard_of(k)]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def scripted(
    *words: str, end: int = KNOWN_IDS[EOT]
) -> Callable[[StepAudioModel, TextTokenizer], None]:
    """A ``modify`` for :func:`write_tiny_checkpoint`: the model deterministically continues
    ``"\\n"`` with ``words`` and then token ``end`` (``<|EOT|>``). Every layer's output is
    zeroed, so the next token depends only on the current one, and embeddings and ``lm_head``
    chain each token to the next. A word may take several tokens (``" café"``: six byte-level
    ones), but no token may come twice in the chain."""

    def modify(model: StepAudioModel, tok: TextTokenizer) -> None:
        dec = model.decoder
        for layer in dec.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        chain = [t for w in ("\n", *words) for t in tok.encode(w)] + [end]
        assert len(set(chain)) == len(chain) <= dec.model.embed_tokens.weight.shape[1], chain
        emb, head = dec.model.embed_tokens.weight, dec.lm_head.weight
        head.mul_(0.01)
        for i, (cur, nxt) in enumerate(itertools.pairwise(chain)):
            emb[cur].zero_()
            emb[cur, i] = 1.0
            head[nxt].zero_()
            head[nxt, i] = 10.0

    return modify


# A scripted tool call (``scripted(*TOOL_CALL)``, with ``words=TOOL_CALL_WORDS`` so that each
# piece is one token): ``<|CALL_START|>get_weather{"city":"Paris"}<|CALL_END|>``.
TOOL_CALL_WORDS = ("get", "weather", '{"', "city", '":"', "Paris", '"}')
TOOL_CALL = ("<|CALL_START|>", "get", "_", *TOOL_CALL_WORDS[1:], "<|CALL_END|>")


# ---- driving an engine built on such a checkpoint -------------------------------------------
RATE = 16000


def cpu_engine(path: Path, **kw: object) -> Any:
    """A ``StepAudioEngine`` on the CPU over the checkpoint at ``path`` (``kw``: EngineConfig
    fields, and ``opts``: StepAudioOptions)."""
    from realtime.config import EngineConfig
    from realtime.engine.step_audio import build_step_audio_engine

    opts = kw.pop("opts", None)
    kw.setdefault("max_context", 512)
    cfg = EngineConfig(backend="step-audio", model=str(path), device="cpu", **kw)
    return build_step_audio_engine(cfg, opts)  # type: ignore[arg-type]


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A gliding tone with noise: audio with some structure for the encoder (no words)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(3 * t)) * t)
    return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def listen_in_pieces(session: Any, pcm: np.ndarray, piece: float = 0.2) -> None:
    step = int(piece * RATE)
    for i in range(0, pcm.shape[0], step):
        session.listen(pcm[i : i + step])


def heard(session: Any, audio: np.ndarray) -> Any:
    """The turn of ``audio``: what ``session`` has not listened to yet is listened now."""
    from realtime.engine.base import UserTurn

    session.listen(audio[session._l.audio.shape[0] :])
    return UserTurn()
