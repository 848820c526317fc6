"""One rank's part of the Step-Audio model when its decoder is split over ``world`` ranks
(:mod:`realtime.models.tensor_parallel`).

Rank 0 holds the whole audio encoder and adapter and its shard of the decoder
(:func:`build_rank0`); ranks 1.. hold only their decoder shard (:func:`build_follower`). A
shard is filled either from the checkpoint (each tensor's part read with a safetensors slice,
so no rank reads or holds a whole sharded matrix) or with the random weights of
:func:`~realtime.models.step_audio.model.fill_random` drawn in full with the same seed and the
rank's part kept, so that world ``N`` computes what world 1 does with those weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from realtime.models.qwen2 import Qwen2ForCausalLM
from realtime.models.step_audio.checkpoint import find_checkpoint_files, load_shard_weights
from realtime.models.step_audio.config import StepAudioConfig
from realtime.models.step_audio.model import (
    StepAudioModel,
    build_empty,
    checkpoint_name,
    full_tensors,
    random_init_kind,
)
from realtime.models.tensor_parallel import local_config, shard_slice


def sharded_config(cfg: StepAudioConfig, world: int) -> StepAudioConfig:
    """``cfg`` with the decoder's config that of one rank's shard (ValueError if ``world``
    does not divide the heads, KV heads and MLP width)."""
    return dataclasses.replace(cfg, text=local_config(cfg.text, world))


def decoder_targets(decoder: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """The decoder's tensors by checkpoint name (``model.*``, ``lm_head.weight`` unless tied)."""
    out = dict(decoder.state_dict(keep_vars=True))
    if decoder.cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def empty_decoder(
    cfg: StepAudioConfig, world: int, device: torch.device, dtype: torch.dtype
) -> Qwen2ForCausalLM:
    """One rank's decoder shard with uninitialised weights on ``device``."""
    with torch.device("meta"):
        dec = Qwen2ForCausalLM(local_config(cfg.text, world))
    dec = dec.to(dtype).to_empty(device=device)
    dec.after_to_empty()
    return dec.eval().requires_grad_(False)


@torch.no_grad()
def fill_random_shard(
    targets: dict[str, torch.Tensor],
    cfg: StepAudioConfig,
    rank: int,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    std: float = 0.02,
) -> None:
    """Fill ``targets`` (checkpoint name -> this rank's tensor) with their parts of the
    weights :func:`fill_random` gives the whole model: every random parameter is drawn in
    full, in the whole model's order, from one generator seeded with ``seed`` (those the rank
    does not hold too, to keep the generator in step), and the rank's part of each checkpoint
    tensor in it (a fused ``qkv_proj`` holds ``q_proj``, ``k_proj``, ``v_proj``) is kept."""
    with torch.device("meta"):
        full = StepAudioModel(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in full.named_parameters():
        owner, leaf, kind = name.rsplit(".", 2)
        fused = getattr(full.get_submodule(owner), "checkpoint_parts", {}).get(leaf)
        base = checkpoint_name(f"{owner}.")
        parts = (
            [(f"{base}{part}.{kind}", rows) for part, rows in fused.items()]
            if fused
            else [(checkpoint_name(name), p.shape[0])]
        )
        init = random_init_kind(name)
        t = None
        if init == "normal":
            t = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)
        row = 0
        for ck, rows in parts:
            target = targets.get(ck)
            if target is not None and t is None:
                target.fill_(1.0 if init == "one" else 0.0)
            elif target is not None:
                piece = t[row : row + rows] if fused else t
                target.copy_(piece[shard_slice(ck, tuple(piece.shape), rank, world)])
            row += rows
        del t


def load_shard(
    targets: dict[str, torch.Tensor],
    root: str | Path,
    cfg: StepAudioConfig,
    rank: int,
    world: int,
    device: torch.device,
) -> None:
    """Fill ``targets`` with their parts of the checkpoint directory ``root``."""
    load_shard_weights(targets, find_checkpoint_files(root), full_tensors(cfg), rank, world, device)


def build_rank0(
    cfg: StepAudioConfig,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: str | Path | None,
    seed: int = 0,
) -> StepAudioModel:
    """Rank 0's model: the whole encoder and adapter, decoder shard 0 (from ``checkpoint``, or
    random weights when it is ``None``)."""
    model = build_empty(sharded_config(cfg, world), device, dtype)
    targets = model.checkpoint_tensors()
    if checkpoint is None:
        fill_random_shard(targets, cfg, 0, world, device, dtype, seed)
    else:
        load_shard(targets, checkpoint, cfg, 0, world, device)
    return model


def build_follower(
    cfg: StepAudioConfig,
    rank: int,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: str | Path | None,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """Rank ``rank``'s decoder shard (no encoder)."""
    dec = empty_decoder(cfg, world, device, dtype)
    targets = decoder_targets(dec)
    if checkpoint is None:
        fill_random_shard(targets, cfg, rank, world, device, dtype, seed)
    else:
        load_shard(targets, checkpoint, cfg, rank, world, device)
    return dec
