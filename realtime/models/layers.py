"""The math of one Qwen2.5 decoder layer, as pure functions of its weights.

This is the only place it is written. The modules of ``qwen2.py`` own the weights (fused
``qkv_proj`` and ``gate_up_proj`` from the start) and their forward calls
:func:`layer_forward`; the runner (``decode.py``) calls the same functions, compiled:
:func:`pre_attention` and :func:`post_attention` around :func:`attend_cache` for pre-fill, and
:func:`layer_decode` (the same pieces around :func:`attend_cache_step`) for the one-token step.

    x -> rms_norm -> qkv projection -> RoPE -> attention to the cache -> o_proj -> + x
      -> rms_norm -> gate/up projection -> SiLU(gate) * up -> down_proj -> + x
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from realtime.models.attention import AttnContext, attend_cache, attend_cache_step
from realtime.models.fp8 import Fp8Weight, linear
from realtime.models.tensor_parallel import all_reduce

Weight = torch.Tensor | Fp8Weight  # a projection's weight: plain, or FP8 (``fp8.py``)


class LayerWeights(NamedTuple):
    """One layer's tensors (the modules' parameters themselves, never copies)."""

    ln1: torch.Tensor  # input_layernorm [H]
    qkv_w: Weight  # [(Hq + 2 Hkv) * D, H]: q, k, v stacked
    qkv_b: torch.Tensor | None  # [(Hq + 2 Hkv) * D] or None (attention_bias=False)
    o_w: Weight  # [H, Hq * D]
    ln2: torch.Tensor  # post_attention_layernorm [H]
    gu_w: Weight  # [2 I, H]: gate, up stacked
    down_w: Weight  # [H, I]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back before the weight (as transformers' Qwen2)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions [B, T]`` -> cos, sin ``[B, T, 1, head_dim]`` (computed in float32)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def pre_attention(
    x: torch.Tensor,
    ln: torch.Tensor,
    qkv_w: Weight,
    qkv_b: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    n_heads: int,
    n_kv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, T, H]`` -> ``q [B, T, Hq, D]``, ``k``, ``v [B, T, Hkv, D]`` (RoPE applied)."""
    b, t, _ = x.shape
    qkv = linear(rms_norm(x, ln, eps), qkv_w, qkv_b)
    d = qkv.shape[-1] // (n_heads + 2 * n_kv)
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    q = apply_rope(q.reshape(b, t, n_heads, d), cos, sin)
    k = apply_rope(k.reshape(b, t, n_kv, d), cos, sin)
    return q, k, v.reshape(b, t, n_kv, d)


def post_attention_split(
    x: torch.Tensor,
    attn: torch.Tensor,
    o_w: Weight,
    ln: torch.Tensor,
    gu_w: Weight,
    down_w: Weight,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output projection and the MLP: returns ``(x', mlp_out)`` whose sum is
    the layer's output (left unsummed so that the runner can fuse the add into the next
    layer's RMSNorm). Under tensor parallelism (``tensor_parallel.py``) both row-split
    products are summed over the ranks."""
    x = x + all_reduce(linear(attn, o_w))
    gate, up = linear(rms_norm(x, ln, eps), gu_w).chunk(2, dim=-1)
    return x, all_reduce(linear(F.silu(gate) * up, down_w))


def post_attention(
    x: torch.Tensor,
    attn: torch.Tensor,
    o_w: Weight,
    ln: torch.Tensor,
    gu_w: Weight,
    down_w: Weight,
    eps: float,
) -> torch.Tensor:
    x, mlp_out = post_attention_split(x, attn, o_w, ln, gu_w, down_w, eps)
    return x + mlp_out


PreAttention = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
PostAttention = Callable[..., torch.Tensor]


def layer_forward(
    x: torch.Tensor,
    lw: LayerWeights,
    kc: torch.Tensor,
    vc: torch.Tensor,
    ctx: AttnContext,
    eps: float,
    n_heads: int,
    n_kv: int,
    pre: PreAttention = pre_attention,
    post: PostAttention = post_attention,
) -> torch.Tensor:
    """One decoder layer over ``x [B, T, H]`` (any ``T``), keys/values written into one
    layer's cache ``kc``/``vc``. ``pre``/``post``: :func:`pre_attention` and
    :func:`post_attention` or compiled versions of them (the runner's)."""
    q, k, v = pre(x, lw.ln1, lw.qkv_w, lw.qkv_b, ctx.cos, ctx.sin, eps, n_heads, n_kv)
    attn = attend_cache(q, k, v, kc, vc, ctx)
    return post(x, attn, lw.o_w, lw.ln2, lw.gu_w, lw.down_w, eps)


def layer_decode(
    x: torch.Tensor,
    delta: torch.Tensor,
    lw: LayerWeights,
    kc: torch.Tensor,
    vc: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    slots: torch.Tensor,
    visible: torch.Tensor,
    eps: float,
    n_heads: int,
    n_kv: int,
    fused_attention: bool = False,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for one new token per row (``x [B, 1, H]``), attention by
    :func:`attend_cache_step`. Meant for ``torch.compile`` as a whole (one compiled function
    shared by all layers).

    The residual stream is ``x + delta`` and the layer returns ``(x', delta')`` unsummed, so
    the last residual add of one layer fuses with the first RMSNorm of the next.
    ``table``: the rows' block-table rows when the cache is paged (``kv_pages.py``).
    """
    x = x + delta
    q, k, v = pre_attention(x, lw.ln1, lw.qkv_w, lw.qkv_b, cos, sin, eps, n_heads, n_kv)
    attn = attend_cache_step(q, k, v, kc, vc, pos, slots, visible, fused_attention, table)
    return post_attention_split(x, attn, lw.o_w, lw.ln2, lw.gu_w, lw.down_w, eps)
