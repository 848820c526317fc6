"""The project's own Qwen2.5 decoder (also Llama-shaped models: ``attention_bias=False``).

Written for a fast one-token step rather than for generality:

* ``KVCache`` is allocated once (``[slots, max_len, kv_heads, head_dim]`` per layer, the layout
  ``flash_attn_with_kvcache`` wants) and written by position with ``index_put_``; nothing is ever
  concatenated, so a decode step has static shapes and can be captured as a CUDA graph.
* A row of the batch is a *slot* of the cache (``slots[b]``), owned by one session. Each query
  attends to the keys at positions ``<= its own position`` of its slot, so rolling a slot back
  (speculative work thrown away) is only a length reset: stale keys beyond it are masked.
* Attention with PyTorch SDPA groups the query heads that share a KV head into the query-length
  dimension (``[B, kv_heads, group*T, D]``) so the cache is never repeated per head; the mask
  carries both causality and the per-slot length. ``attn_len`` bounds how much of the cache is
  read (a static bucket chosen by the caller).
* With the ``flash_attn`` package, ``flash_attn_with_kvcache`` reads the slots in place
  (``cache_batch_idx``) with per-row lengths; it needs the new keys to be contiguous per row.

State-dict names match transformers' ``Qwen2ForCausalLM`` exactly, so checkpoints load as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional fast attention
    from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_with_kvcache = None


def flash_attn_available() -> bool:
    return flash_attn_with_kvcache is not None


@dataclass(frozen=True)
class Qwen2Config:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attention_bias: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_text_config(cls, d: dict[str, Any]) -> Qwen2Config:
        """Build from a checkpoint's ``text_config`` (or a plain Qwen2/Llama ``config.json``)."""
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise KeyError(f"text config is missing {', '.join(missing)}")
        if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
            raise ValueError(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 may nest it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            vocab_size=int(d["vocab_size"]),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            attention_bias=bool(d.get("attention_bias", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    def num_parameters(self) -> int:
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h
        heads = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + heads + h


class KVCache:
    """Static cache: per layer ``k``/``v`` of shape ``[max_batch + 1, max_len, kv_heads, head_dim]``.

    Slots ``0..max_batch-1`` are handed out to sessions with :meth:`allocate` and returned with
    :meth:`free`; the extra row ``scratch_slot`` is never handed out (padding rows of a batched
    step and graph capture write there). ``lengths[slot]`` is host-side bookkeeping of how many
    positions of a slot are valid; the model itself only trusts the positions it is given.
    """

    def __init__(
        self,
        cfg: Qwen2Config,
        max_batch: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (max_batch + 1, max_len, cfg.num_key_value_heads, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.max_batch = max_batch
        self.max_len = max_len
        self.scratch_slot = max_batch
        self.lengths = [0] * (max_batch + 1)
        self._free = list(range(max_batch))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes_per_position(self) -> int:
        k = self.k[0]
        return 2 * len(self.k) * k.shape[2] * k.shape[3] * k.element_size()

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache full: {n} slot(s) wanted, {len(self._free)} free")
        slots, self._free = self._free[:n], self._free[n:]
        for s in slots:
            self.lengths[s] = 0
        return slots

    def free(self, slots: list[int]) -> None:
        for s in slots:
            if s in self._free or s == self.scratch_slot:
                continue
            self.lengths[s] = 0
            self._free.append(s)
        self._free.sort()

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Fork: positions ``0..n-1`` of slot ``src`` into slot ``dst`` (device copies only)."""
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :n].copy_(kc[src, :n])
            vc[dst, :n].copy_(vc[src, :n])
        self.lengths[dst] = n


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions [B, T]`` -> cos, sin ``[B, T, 1, head_dim]`` (computed in float32)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


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
    ) -> AttnContext:
        """The attention path for one forward: ``flash_attn`` when wanted; PyTorch's flash
        kernel for a one-sequence pre-fill when available; else SDPA with a bool mask."""
        b, t = positions.shape
        if use_flash:
            return cls(positions, slots, cos, sin, attn_len, None, True)
        if torch_flash and b == 1 and t > 1:
            varlen = VarlenFlash.for_prefill(positions, slots, max_len, attn_len)
            return cls(positions, slots, cos, sin, attn_len, None, False, varlen)
        mask = attention_mask(positions, attn_len, group)
        return cls(positions, slots, cos, sin, attn_len, mask, False)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = hd
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache, ctx: AttnContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        out = attend_cache(q, k, v, cache.k[self.layer], cache.v[self.layer], ctx)
        return self.o_proj(out)


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
    g = n_heads // n_kv
    # head h uses kv head h // g: fold the group into the query length, never repeat the cache
    qg = q.view(b, t, n_kv, g, head_dim).permute(0, 2, 3, 1, 4).reshape(b, n_kv, g * t, head_dim)
    out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=ctx.mask)
    out = out.view(b, n_kv, g, t, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(b, t, n_heads * head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache: KVCache, ctx: AttnContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask(positions: torch.Tensor, attn_len: int, group: int) -> torch.Tensor:
    """Key ``j`` is visible to the query at position ``p`` iff ``j <= p``: ``[B, 1, g*T, L]``."""
    b, t = positions.shape
    keys = torch.arange(attn_len, device=positions.device)
    mask = keys[None, None, :] <= positions[:, :, None]  # [B, T, L]
    return mask[:, None, None].expand(b, 1, group, t, attn_len).reshape(b, 1, group * t, attn_len)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        hd = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.use_flash = False  # set by the runner when flash_attn is importable and wanted
        self.torch_flash = False  # set by the runner: pre-fill through PyTorch's flash kernel

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def weight_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        *,
        last_only: bool = False,
        attn_len: int | None = None,
    ) -> torch.Tensor:
        """``embeds [B, T, H]`` at ``positions [B, T]`` of cache rows ``slots [B]`` -> logits.

        Writes the new keys/values into the cache. ``last_only``: logits of the last position
        only (``[B, 1, V]``, for prefill). ``attn_len``: read only the first ``attn_len``
        positions of each slot (must exceed every position; default the whole cache).
        """
        b, t, _ = embeds.shape
        cfg = self.cfg
        length = cache.max_len if attn_len is None else min(attn_len, cache.max_len)
        use_flash = self.use_flash and flash_attn_with_kvcache is not None
        cos, sin = rope_cos_sin(positions, self.inv_freq, embeds.dtype)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        ctx = AttnContext.build(
            positions, slots, cos, sin, length, group,
            max_len=cache.max_len, use_flash=use_flash, torch_flash=self.torch_flash,
        )  # fmt: skip
        x = embeds
        for layer in self.model.layers:
            x = layer(x, cache, ctx)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
