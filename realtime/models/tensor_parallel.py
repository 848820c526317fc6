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
* replicated: embeddings, norms, ``lm_head`` (every rank computes the same logits, so every
  rank samples the same greedy token without another collective).

So each rank reads ``1 / world`` of the layer weights per step and holds ``1 / world`` of the
KV cache (its heads), and each layer costs two all-reduces of ``[batch, hidden]``.
:func:`set_group` turns the reduction on for this process.
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
# the symmetric-memory buffer, the group's name, whether the one-shot kernel copies the local
# input into the buffer itself (``one_shot_all_reduce_copy``, PyTorch >= 2.8)
_symm: tuple[torch.Tensor, str, bool] | None = None


def set_group(group: ProcessGroup | None) -> None:
    """The process group whose ranks share the decoder (``None``: no tensor parallelism)."""
    global _group, _symm
    _group, _symm = group, None


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
    if _group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(_group)


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


Cfg = TypeVar("Cfg")


def local_config(cfg: Cfg, world: int) -> Cfg:
    """The config (a ``Qwen2Config``; not imported here, as qwen2 imports this module through
    layers) of one rank's shard of a decoder split ``world`` ways."""
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
    )


_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split
_ROW = ("o_proj", "down_proj")  # input columns split


def shard_dim(name: str) -> int | None:
    """The dimension along which tensor ``name`` (a checkpoint name: ``q_proj``,
    ``gate_proj``, ...) is split over the ranks; ``None``: replicated."""
    parts = name.split(".")
    proj = parts[-2] if len(parts) >= 2 else ""
    if proj in _COLUMN:
        return 0
    if proj in _ROW and parts[-1] == "weight":
        return 1
    return None


def shard_slice(name: str, shape: tuple[int, ...], rank: int, world: int) -> tuple[slice, ...]:
    """The index of rank ``rank``'s part of the full tensor ``name`` of ``shape`` (whole
    tensor when replicated): ``full[idx]`` is the shard, for a tensor or a safetensors slice."""
    dim = shard_dim(name)
    idx = [slice(None)] * len(shape)
    if dim is not None and world > 1:
        if shape[dim] % world:
            raise ValueError(f"{name}: dimension {dim} ({shape[dim]}) does not divide by {world}")
        n = shape[dim] // world
        idx[dim] = slice(rank * n, (rank + 1) * n)
    return tuple(idx)


def shard_state_dict(
    state: dict[str, torch.Tensor], rank: int, world: int
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of a full decoder ``state_dict`` (checkpoint names: ``q_proj``,
    ``gate_proj``, ...). Q/K/V rows are whole heads, in order, so rank ``r`` holds query
    heads ``r * Hq/world ..`` and the KV heads they are grouped with."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if shard_dim(name) is None:
            out[name] = t
        else:
            out[name] = t[shard_slice(name, tuple(t.shape), rank, world)].clone()
    return out
