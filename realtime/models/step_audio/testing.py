"""A tiny random Step-Audio checkpoint in exactly the real layout, for tests.

Same tensor names and config keys as the real one, several safetensors shards with
``model.safetensors.index.json``, bf16 tensors, and a ``tokenizer.json`` (a byte-level BPE like
Qwen's, a few hundred text tokens) with the special tokens at the real ids. The decoder's
``vocab_size`` is 151700 so those ids exist; everything else is tiny (width 32, two layers).

Ids fixed by public code: ``<|EOT|>`` 151665, ``<audio_start>`` 151688, ``<audio_patch>``
151690. The others below (``<|BOT|>``, ``<think>``, ``<audio_end>``, ...) are placeholders in
the same range; the real ones are always read from the real tokenizer by name.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from realtime.models.qwen2 import Qwen2Config
from realtime.models.step_audio.config import AudioEncoderConfig, StepAudioConfig
from realtime.models.step_audio.model import StepAudioModel, checkpoint_name, fill_random
from realtime.models.step_audio.tokens import EOT, KNOWN_IDS, TextTokenizer

TINY_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|EOT|>": 151665,
    "<|BOT|>": 151666,
    "<think>": 151667,
    "</think>": 151668,
    "<|CALL_START|>": 151669,
    "<|CALL_END|>": 151670,
    "<audio_start>": 151688,
    "<audio_end>": 151689,
    "<audio_patch>": 151690,
    "<tts_start>": 151693,
    "<tts_end>": 151694,
}
TINY_WORDS = ("system", "human", "assistant", "hmm", "Hi", "hello", "think", " the", " you")
TINY_VOCAB_SIZE = 151700


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


def tiny_tokenizer_json() -> str:
    """Byte-level BPE: the 256 byte symbols, merges for a few words, the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        sym = "".join(s for s, _ in byte_level.pre_tokenize_str(word))
        for k in range(1, len(sym)):
            left, right = sym[:k], sym[k]
            if sym[: k + 1] not in vocab:
                merges.append((left, right))
                vocab[sym[: k + 1]] = len(vocab)
    vocab.update(TINY_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS]
    )
    return str(tok.to_str())


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
) -> Path:
    """Write a random tiny checkpoint to directory ``path`` (created) and return it.
    ``modify(model, tokenizer)`` may set weights before they are saved."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    (path / "tokenizer.json").write_text(tiny_tokenizer_json())
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json(), indent=2))
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
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


def scripted(*words: str) -> Callable[[StepAudioModel, TextTokenizer], None]:
    """A ``modify`` for :func:`write_tiny_checkpoint`: the model deterministically continues
    ``"\\n"`` with ``words`` and then ``<|EOT|>``. Every layer's output is zeroed, so the next
    token depends only on the current one, and embeddings and ``lm_head`` chain each token to
    the next (each word must be one token of the tiny vocabulary)."""

    def modify(model: StepAudioModel, tok: TextTokenizer) -> None:
        dec = model.decoder
        for layer in dec.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        chain = [tok.encode(w)[0] for w in ("\n", *words)] + [KNOWN_IDS[EOT]]
        emb, head = dec.model.embed_tokens.weight, dec.lm_head.weight
        head.mul_(0.01)
        for i, (cur, nxt) in enumerate(itertools.pairwise(chain)):
            emb[cur].zero_()
            emb[cur, i] = 1.0
            head[nxt].zero_()
            head[nxt, i] = 10.0

    return modify
