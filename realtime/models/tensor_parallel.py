"""Tensor parallelism of the Qwen2 decoder over ``torch.distributed`` (NCCL on GPUs, gloo on
CPUs), in the manner of gpt-fast.

Each rank holds a *local* decoder: the same module code with a local config
(:func:`local_config`: ``heads / world`` query heads, ``kv_heads / world`` KV heads,
``intermediate / world`` MLP width, the head size kept). Its weights are a shard of the full
ones (:func:`shard_state_dict`):

* column split (output rows), by whole heads: ``q_proj``/``k_proj``/``v_proj`` (and their
  biases), ``gate_proj``/``up_proj``;
* row split (input columns): ``o_proj``, ``down_proj``; their outputs are partial sums,
  added over the ranks by :func:`all_reduce` (called by ``layers.post_attention_split``,
  a no-op while no group is set);
* vocabulary split (rows): ``lm_head``, when it is its own matrix and ``world`` divides the
  vocabulary (:func:`splits_vocab`; the local config's ``vocab_shards``): rank ``r`` computes
  the logits of tokens ``r * V / world ..`` and :func:`gather_vocab` all-gathers the slices,
  so every rank has the same full logits and samples the same greedy token. An FP8
  ``lm_head`` (``fp8.quantize_lm_head_``, per-row scales) is quantised per rank after the
  split, so its scales are split with its rows;
* replicated: embeddings, norms, and ``lm_head`` where it is not split: tied to the
  embeddings (every rank needs the whole embedding table) or a vocabulary that ``world``
  does not divide.

So each rank reads ``1 / world`` of the layer and ``lm_head`` weights per step and holds
``1 / world`` of the KV cache (its heads); each layer costs two all-reduces of
``[batch, hidden]`` and the step one all-gather of ``[batch, vocab]`` logits.
:func:`set_group` turns the collectives on for this process.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


log = logging.getLogger(__name__)
_group: ProcessGroup | None = None
_world = 1  # the group's size
# the symmetric-memory buffer, the group's name, whether the one-shot kernel copies the local
# input into the buffer itself (``one_shot_all_reduce_copy``, PyTorch >= 2.8)
_symm: tuple[torch.Tensor, str, bool] | None = None


def set_group(group: ProcessGroup | None) -> None:
    """The process group whose ranks share the decoder (``None``: no tensor parallelism)."""
    global _group, _symm, _world
    _group, _symm, _world = group, None, 1
    if group is not None:
        import torch.distributed as dist

        _world = dist.get_world_size(group)


def _has_copy_kernel() -> bool:
    """Whether this PyTorch has ``symm_mem::one_shot_all_reduce_copy`` (2.8 and later)."""
    try:
        return hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy")
    except Exception:  # noqa: BLE001 - no symm_mem namespace at all
        return False


def use_symmetric_memory(
    numel: int, dtype: torch.dtype, device: torch.device, copy_in_kernel: bool = True
) -> bool:
    """Sum small tensors (up to ``numel`` elements) with PyTorch's one-shot all-reduce over
    symmetric memory (peer-to-peer loads between the GPUs, no NVLink multicast) instead of
    NCCL; returns whether it is available. Every rank must call it.

    ``copy_in_kernel``: where PyTorch has ``one_shot_all_reduce_copy``, the kernel itself
    copies the local partial sum into the symmetric buffer (one kernel per all-reduce);
    otherwise (or with ``False``) a ``copy_`` into the buffer comes first (two kernels)."""
    global _symm
    if _group is None:
        return False
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(numel, dtype=dtype, device=device)
        symm_mem.rendezvous(buf, _group.group_name)
        _symm = (buf, _group.group_name, copy_in_kernel and _has_copy_kernel())
    except Exception as exc:  # noqa: BLE001 - not built in, or no peer access: NCCL it is
        log.warning("symmetric memory unavailable (%s): all-reduce through NCCL", exc)
        _symm = None
    return _symm is not None


def all_reduce_kind() -> str:
    """How :func:`all_reduce` sums (for logs and benchmarks): ``none`` (no group), ``nccl``
    (the group's backend: NCCL, or gloo on the CPU), ``symm-mem one-shot`` (copy, then the
    kernel) or ``symm-mem one-shot copy`` (the kernel copies its input itself)."""
    if _group is None:
        return "none"
    if _symm is None:
        return "nccl"
    return "symm-mem one-shot copy" if _symm[2] else "symm-mem one-shot"


def world_size() -> int:
    return _world


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the tensor-parallel ranks (identity without a group). Traced by
    ``torch.compile`` as a functional collective; eager, an in-place NCCL/gloo all-reduce
    (which CUDA graphs capture)."""
    if _group is None:
        return t
    if _symm is not None and t.numel() <= _symm[0].numel() and t.dtype == _symm[0].dtype:
        sbuf, name, copy_in_kernel = _symm
        buf = sbuf[: t.numel()]
        if copy_in_kernel:  # the kernel writes ``t`` into this rank's buffer, then sums
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(
                buf, t.contiguous().view(-1), "sum", name
            )
        else:
            buf.copy_(t.reshape(-1))
            out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
        return out.view(t.shape)
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(t, "sum", _group)
    import torch.distributed as dist

    dist.all_reduce(t, group=_group)
    return t


def gather_vocab(t: torch.Tensor, shards: int) -> torch.Tensor:
    """The full logits from each rank's vocabulary slice: ``t [..., V / shards]`` (rank ``r``'s
    logits of tokens ``r * V / shards ..``) -> ``[..., V]``, the same on every rank.

    Eager, one ``all_gather_into_tensor`` (``all_gather_single``) into a tensor made here
    (NCCL: captured by CUDA graphs, the output then lives in the graph's pool); traced by
    ``torch.compile``, the functional all-gather. Both gather along the rows of ``t``
    flattened to ``[M, V/shards]`` and then put each row's slices side by side (a copy of
    ``M x V`` values)."""
    if _world != shards:
        raise RuntimeError(
            f"lm_head is split over {shards} ranks but the tensor-parallel group has {_world}"
            " (tensor_parallel.set_group)"
        )
    lead, n = t.shape[:-1], t.shape[-1]
    rows = t.reshape(-1, n).contiguous()
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        out = gather(rows, 0, _group)
    else:
        import torch.distributed as dist

        out = rows.new_empty((shards * rows.shape[0], n))
        # all_gather_into_tensor, renamed all_gather_single in newer PyTorch (same call)
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_into(out, rows, group=_group)
    # [shards * M, n] (rank-major) -> [M, shards * n]
    return out.view(shards, -1, n).transpose(0, 1).reshape(*lead, shards * n)


Cfg = TypeVar("Cfg")


def splits_vocab(cfg: Cfg, world: int) -> bool:
    """Whether ``lm_head`` is split by vocabulary rows over ``world`` ranks: when it is its
    own matrix (not tied to the embeddings, which stay whole) and ``world`` divides the
    vocabulary; otherwise it is replicated."""
    return (
        world > 1
        and not cfg.tie_word_embeddings  # type: ignore[attr-defined]
        and cfg.vocab_size % world == 0  # type: ignore[attr-defined]
    )


def local_config(cfg: Cfg, world: int, split_vocab: bool = True) -> Cfg:
    """The config (a ``Qwen2Config``; not imported here, as qwen2 imports this module through
    layers) of one rank's shard of a decoder split ``world`` ways. ``vocab_shards`` is
    ``world`` where :func:`splits_vocab` (and ``split_vocab``), else 1."""
    parts = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
    }
    bad = [f"{k}={v}" for k, v in parts.items() if v % world]
    if bad:
        raise ValueError(f"tensor parallel over {world} ranks needs {', '.join(bad)} to divide")
    return dataclasses.replace(
        cfg,
        num_attention_heads=cfg.num_attention_heads // world,
        num_key_value_heads=cfg.num_key_value_heads // world,
        intermediate_size=cfg.intermediate_size // world,
        fixed_head_dim=cfg.head_dim,
        vocab_shards=world if split_vocab and splits_vocab(cfg, world) else 1,
    )


_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split
_ROW = ("o_proj", "down_proj")  # input columns split
LM_HEAD = "lm_head.weight"  # vocabulary rows split (see :func:`splits_vocab`)


def shard_dim(name: str) -> int | None:
    """The dimension along which tensor ``name`` (a checkpoint name: ``q_proj``,
    ``gate_proj``, ..., ``lm_head.weight``) is split over the ranks; ``None``: replicated.
    (``lm_head`` stays whole where its rows do not divide: :func:`shard_slice`.)"""
    if name == LM_HEAD:
        return 0
    parts = name.split(".")
    proj = parts[-2] if len(parts) >= 2 else ""
    if proj in _COLUMN:
        return 0
    if proj in _ROW and parts[-1] == "weight":
        return 1
    return None


def shard_slice(
    name: str, shape: tuple[int, ...], rank: int, world: int, split_vocab: bool = True
) -> tuple[slice, ...]:
    """The index of rank ``rank``'s part of the full tensor ``name`` of ``shape`` (whole
    tensor when replicated): ``full[idx]`` is the shard, for a tensor or a safetensors slice.
    ``lm_head.weight``: its rows ``rank * V / world ..`` when ``world`` divides them and
    ``split_vocab`` (as :func:`local_config`), else whole. (A tied ``lm_head`` is the
    embeddings, which loaders fill whole: it never comes here.)"""
    dim = shard_dim(name)
    idx = [slice(None)] * len(shape)
    if name == LM_HEAD and (not split_vocab or shape[0] % world):
        return tuple(idx)
    if dim is not None and world > 1:
        if shape[dim] % world:
            raise ValueError(f"{name}: dimension {dim} ({shape[dim]}) does not divide by {world}")
        n = shape[dim] // world
        idx[dim] = slice(rank * n, (rank + 1) * n)
    return tuple(idx)


def shard_state_dict(
    state: dict[str, torch.Tensor], rank: int, world: int, split_vocab: bool = True
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of a full decoder ``state_dict`` (checkpoint names: ``q_proj``,
    ``gate_proj``, ...). Q/K/V rows are whole heads, in order, so rank ``r`` holds query
    heads ``r * Hq/world ..`` and the KV heads they are grouped with; ``lm_head`` rows as
    :func:`shard_slice`, whole when it is the embeddings' tensor (tied)."""
    head, emb = state.get(LM_HEAD), state.get("model.embed_tokens.weight")
    tied = head is not None and emb is not None and head.data_ptr() == emb.data_ptr()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        idx = shard_slice(name, tuple(t.shape), rank, world, split_vocab and not tied)
        if all(i == slice(None) for i in idx):
            out[name] = t
        else:
            out[name] = t[idx].clone()
    return out
