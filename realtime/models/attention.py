"""Attention of the Qwen2.5 decoder against the slot KV cache (the only place it is written).

The cache (``KVCache`` in ``qwen2.py``) is ``[slots, max_len, kv_heads, head_dim]`` per layer;
row ``slots[b]`` of it belongs to row ``b`` of the batch. New keys/values are written by
position, never concatenated, so every shape is static and a step can be a CUDA graph. Each
query sees the keys at positions ``<= its own position`` of its slot, so rolling a slot back
(speculative work thrown away) is only a length reset: stale keys beyond it are masked.

Two entry points, both ``q, k, v`` in the ``[B, T, heads, head_dim]`` layout of
:func:`realtime.models.layers.pre_attention`:

* :func:`attend_cache` serves any ``T`` (pre-fill, the module forward, the eager step) through
  one of three paths chosen once per forward in :class:`AttnContext`:

  - ``flash_attn_with_kvcache`` (the ``flash_attn`` package) reads the slots in place
    (``cache_batch_idx``) with per-row lengths;
  - PyTorch's own flash kernel in its variable-length form for a one-sequence pre-fill
    (:class:`VarlenFlash`);
  - SDPA with a bool mask; the query heads that share a KV head are folded into the query
    length (``[B, kv_heads, group*T, D]``) so the cache is never repeated per head, and
    ``attn_len`` bounds how much of the cache is read (a static bucket chosen by the caller).

* :func:`attend_cache_step` is the one-new-token step that the runner compiles: plain
  reductions over the slot rows (which inductor fuses), or the one-kernel Triton op
  ``realtime::decode_attention`` (``decode_attention.py``).

With a paged cache (``kv_pages.py``: ``[pages, page_size, kv_heads, head_dim]`` per layer) the
rows of a sequence are found through its block-table row (``table``, ``[B, pages_per_seq]``):
``flash_attn_with_kvcache(..., block_table=table)`` when ``flash_attn`` serves it (page size a
multiple of 256), else the keys are written by flat row index and read back gathered page by
page (:func:`paged_index`, :func:`paged_read`) for SDPA or the step's reductions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional fast attention
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_with_kvcache = None


def flash_attn_available() -> bool:
    return flash_attn_with_kvcache is not None


def torch_flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch's own flash kernel (the one SDPA's flash backend runs) serves this device/dtype."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and hasattr(torch.ops.aten, "_flash_attention_forward")
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


@dataclass
class VarlenFlash:
    """One sequence's queries against its own slot of the cache, in place, through PyTorch's
    flash kernel in its variable-length form.

    SDPA's public flash backend cannot serve a pre-fill after earlier context: queries at
    positions ``p..p+T-1`` must see keys ``0..p+i`` (causal aligned to the bottom right), and a
    CUDA graph needs the key count to live on the device. The variable-length call takes both:
    the keys of slot ``s`` are rows ``s*max_len ..`` of the flattened cache (``cu_k``), the
    number in use is ``used_k`` (a device tensor), and causal masking aligns to that number.
    Nothing is copied or repeated per KV-head group."""

    cu_q: torch.Tensor  # [2] int32: 0, T
    cu_k: torch.Tensor  # [2] int32: slot*max_len, (slot+1)*max_len
    used_k: torch.Tensor  # [1] int32: last position + 1
    max_q: int
    max_k: int

    @classmethod
    def for_prefill(
        cls, positions: torch.Tensor, slots: torch.Tensor, max_len: int, attn_len: int
    ) -> VarlenFlash:
        """Built from device tensors only, so that it can be captured in a CUDA graph."""
        two = torch.arange(2, device=positions.device, dtype=torch.int32)
        t = positions.shape[1]
        return cls(
            cu_q=two * t,
            cu_k=((slots[:1] + two) * max_len).to(torch.int32),
            used_k=(positions[:1, -1] + 1).to(torch.int32),
            max_q=t,
            max_k=attn_len,
        )


def paged_index(
    table: torch.Tensor, positions: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(page, offset)`` in a paged layer cache of ``positions [B, T]`` through ``table
    [B, P]`` (the batch's block-table rows). The cache is written with both as indices of the
    4-D tensor, never through a flattened view (a view written inside a compiled step made
    inductor copy the whole cache every layer)."""
    blocks = (positions // page_size).clamp_max(table.shape[1] - 1)
    return table.long().gather(1, blocks), positions % page_size


def paged_read(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of each row's sequence, gathered: ``[B, length, Hkv, D]``."""
    page_size = cache.shape[1]
    n = min(-(-length // page_size), table.shape[1])
    return cache[table[:, :n].long()].flatten(1, 2)[:, :length]


def attention_mask(positions: torch.Tensor, attn_len: int, group: int) -> torch.Tensor:
    """Key ``j`` is visible to the query at position ``p`` iff ``j <= p``: ``[B, 1, g*T, L]``."""
    b, t = positions.shape
    keys = torch.arange(attn_len, device=positions.device)
    mask = keys[None, None, :] <= positions[:, :, None]  # [B, T, L]
    return mask[:, None, None].expand(b, 1, group, t, attn_len).reshape(b, 1, group * t, attn_len)


@dataclass
class AttnContext:
    """What every layer of one forward shares (built once per forward)."""

    positions: torch.Tensor  # [B, T]
    slots: torch.Tensor  # [B]
    cos: torch.Tensor
    sin: torch.Tensor
    attn_len: int  # keys 0..attn_len-1 of each slot are read
    mask: torch.Tensor | None  # [B, 1, group*T, attn_len] bool (SDPA path)
    use_flash: bool
    varlen: VarlenFlash | None = None  # pre-fill through PyTorch's flash kernel
    table: torch.Tensor | None = None  # [B, P] block-table rows (paged cache), else None
    page_size: int = 0

    @classmethod
    def build(
        cls,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_len: int,
        group: int,
        *,
        max_len: int,
        use_flash: bool,
        torch_flash: bool,
        table: torch.Tensor | None = None,
        page_size: int = 0,
    ) -> AttnContext:
        """The attention path for one forward: ``flash_attn`` when wanted (and importable);
        PyTorch's flash kernel for a one-sequence pre-fill when wanted; else SDPA with a mask.
        ``table``/``page_size``: a paged cache (flash only for pages of a multiple of 256
        positions, as flash-attn 2 requires; no varlen pre-fill)."""
        b, t = positions.shape
        if table is not None:
            flash = use_flash and flash_attn_with_kvcache is not None and page_size % 256 == 0
            mask = None if flash else attention_mask(positions, attn_len, group)
            return cls(positions, slots, cos, sin, attn_len, mask, flash, None, table, page_size)
        if use_flash and flash_attn_with_kvcache is not None:
            return cls(positions, slots, cos, sin, attn_len, None, True)
        if torch_flash and b == 1 and t > 1:
            varlen = VarlenFlash.for_prefill(positions, slots, max_len, attn_len)
            return cls(positions, slots, cos, sin, attn_len, None, False, varlen)
        mask = attention_mask(positions, attn_len, group)
        return cls(positions, slots, cos, sin, attn_len, mask, False)


def attend_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    ctx: AttnContext,
) -> torch.Tensor:
    """Write ``k``/``v`` ``[B, T, Hkv, D]`` into one layer's cache, attend ``q`` ``[B, T, Hq, D]``
    to it; returns ``[B, T, Hq * D]``."""
    b, t, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    if ctx.table is not None:
        return _attend_paged(q, k, v, kc, vc, ctx)
    if ctx.use_flash:
        assert flash_attn_with_kvcache is not None
        out = flash_attn_with_kvcache(
            q,
            kc,
            vc,
            k=k,
            v=v,
            cache_seqlens=ctx.positions[:, 0].to(torch.int32),
            cache_batch_idx=ctx.slots.to(torch.int32),
            causal=True,
        )
        return out.reshape(b, t, n_heads * head_dim)
    rows = ctx.slots[:, None].expand(b, t)
    kc.index_put_((rows, ctx.positions), k)
    vc.index_put_((rows, ctx.positions), v)
    if ctx.varlen is not None:
        fv = ctx.varlen
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(t, n_heads, head_dim),
            kc.view(-1, n_kv, head_dim),
            vc.view(-1, n_kv, head_dim),
            fv.cu_q,
            fv.cu_k,
            fv.max_q,
            fv.max_k,
            0.0,  # dropout
            True,  # causal, aligned to the bottom right (to used_k)
            False,
            seqused_k=fv.used_k,
        )[0]
        return out.reshape(b, t, n_heads * head_dim)
    keys = kc[:, : ctx.attn_len].index_select(0, ctx.slots).transpose(1, 2)  # [B, Hkv, L, D]
    vals = vc[:, : ctx.attn_len].index_select(0, ctx.slots).transpose(1, 2)
    return _sdpa_grouped(q, keys, vals, ctx.mask)


def _sdpa_grouped(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``q [B, T, Hq, D]`` against ``keys``/``vals [B, Hkv, L, D]`` -> ``[B, T, Hq * D]``."""
    b, t, n_heads, head_dim = q.shape
    n_kv = keys.shape[1]
    g = n_heads // n_kv
    # head h uses kv head h // g: fold the group into the query length, never repeat the cache
    qg = q.view(b, t, n_kv, g, head_dim).permute(0, 2, 3, 1, 4).reshape(b, n_kv, g * t, head_dim)
    out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask)
    out = out.view(b, n_kv, g, t, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b, t, n_heads * head_dim)


def _attend_paged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    ctx: AttnContext,
) -> torch.Tensor:
    """:func:`attend_cache` over a paged cache (``kc``/``vc`` ``[pages, page_size, Hkv, D]``)."""
    b, t, n_heads, head_dim = q.shape
    assert ctx.table is not None
    if ctx.use_flash:
        assert flash_attn_with_kvcache is not None
        out = flash_attn_with_kvcache(
            q,
            kc,
            vc,
            k=k,
            v=v,
            cache_seqlens=ctx.positions[:, 0].to(torch.int32),
            block_table=ctx.table,
            causal=True,
        )
        return out.reshape(b, t, n_heads * head_dim)
    at = paged_index(ctx.table, ctx.positions, ctx.page_size)
    kc.index_put_(at, k)
    vc.index_put_(at, v)
    keys = paged_read(kc, ctx.table, ctx.attn_len).transpose(1, 2)  # [B, Hkv, L, D]
    vals = paged_read(vc, ctx.table, ctx.attn_len).transpose(1, 2)
    return _sdpa_grouped(q, keys, vals, ctx.mask)


def attend_cache_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    pos: torch.Tensor,
    slots: torch.Tensor,
    visible: torch.Tensor,
    fused: bool = False,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per row: write ``k``/``v`` ``[B, 1, Hkv, D]`` at ``pos [B]`` of
    ``slots [B]``, attend ``q [B, 1, Hq, D]`` to the cache; returns ``[B, 1, Hq * D]``.

    Meant for ``torch.compile``: each lane's cache rows are read through its slot index inside
    the fused reduction (no gathered copy of the cache). ``visible [B, L]``: which of the first
    ``L`` cache positions each row may see. ``fused``: the one-kernel Triton op instead (it
    reads each row's length from ``pos`` and ignores ``visible``). ``table [B, P]``: a paged
    cache, its rows' block-table rows (then ``slots`` is unused; ``fused`` needs pages of a
    multiple of 64 positions)."""
    b, _, n_heads, d = q.shape
    n_kv = k.shape[2]
    length = visible.shape[1]
    if table is not None:
        page, offset = paged_index(table, pos[:, None], kc.shape[1])
        kc.index_put_((page[:, 0], offset[:, 0]), k[:, 0])
        vc.index_put_((page[:, 0], offset[:, 0]), v[:, 0])
        if fused:
            scale = d**-0.5
            out = torch.ops.realtime.decode_attention_paged(q[:, 0], kc, vc, table, pos, scale)
            return out.reshape(b, 1, n_heads * d)
        keys = paged_read(kc, table, length).float()  # [B, L, Hkv, D]
        vals = paged_read(vc, table, length).float()
        return _step_reduce(q, keys, vals, visible, n_kv)
    kc.index_put_((slots, pos), k[:, 0])
    vc.index_put_((slots, pos), v[:, 0])
    if fused:
        out = torch.ops.realtime.decode_attention(q[:, 0], kc, vc, slots, pos, d**-0.5)
        return out.reshape(b, 1, n_heads * d)
    keys = kc[slots, :length].float()  # [B, L, Hkv, D]
    vals = vc[slots, :length].float()
    return _step_reduce(q, keys, vals, visible, n_kv)


def _step_reduce(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, visible: torch.Tensor, n_kv: int
) -> torch.Tensor:
    """One query per row against float32 ``keys``/``vals [B, L, Hkv, D]``: ``[B, 1, Hq * D]``."""
    b, _, n_heads, d = q.shape
    g = n_heads // n_kv
    qg = q[:, 0].reshape(b, 1, n_kv, g, d).float() * (d**-0.5)
    scores = (qg * keys[:, :, :, None, :]).sum(-1)  # [B, L, Hkv, g]
    scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=1)
    out = (probs[..., None] * vals[:, :, :, None, :]).sum(1)  # [B, Hkv, g, D]
    return out.reshape(b, 1, n_heads * d).to(q.dtype)
