"""The project's own Qwen2.5 decoder (also Llama-shaped models: ``attention_bias=False``).

Written for a fast one-token step rather than for generality:

* ``KVCache`` is allocated once (``[slots, max_len, kv_heads, head_dim]`` per layer, the layout
  ``flash_attn_with_kvcache`` wants) and written by position with ``index_put_``; nothing is ever
  concatenated, so a decode step has static shapes and can be captured as a CUDA graph. A row
  of the batch is a *slot* of the cache (``slots[b]``), owned by one session; how attention
  reads it is in ``attention.py``.
* The modules only own the weights; the layer math is the pure functions of ``layers.py``,
  which the runner (``decode.py``) calls too. q/k/v and gate/up are fused parameters from the
  start (``qkv_proj``, ``gate_up_proj``), so the step runs one matrix product for each.
* State-dict names are transformers' ``Qwen2ForCausalLM`` names all the same: ``state_dict()``
  splits the fused parameters into ``q_proj``/``k_proj``/``v_proj`` and
  ``gate_proj``/``up_proj`` (views, so writing into them writes the fused weight), and
  ``load_state_dict()`` concatenates them back. Checkpoints load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from realtime.models.attention import AttnContext
from realtime.models.fp8 import weight_of
from realtime.models.layers import (
    LayerWeights,
    PostAttention,
    PreAttention,
    layer_forward,
    post_attention,
    pre_attention,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from realtime.models.tensor_parallel import gather_vocab


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
    fixed_head_dim: int = (
        0  # 0: hidden_size // num_attention_heads (a tensor-parallel shard sets it)
    )
    # a tensor-parallel shard (tensor_parallel.local_config): lm_head holds vocab_size /
    # vocab_shards rows (this rank's slice of the vocabulary) and the logits are gathered
    vocab_shards: int = 1

    @property
    def head_dim(self) -> int:
        return self.fixed_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def head_rows(self) -> int:
        """Rows of ``lm_head`` (this rank's part of the vocabulary)."""
        return self.vocab_size // self.vocab_shards

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
        heads = self.vocab_size * h + (0 if self.tie_word_embeddings else self.head_rows * h)
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

    full_error: type[RuntimeError] = RuntimeError  # what a full cache raises

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise self.full_error(f"KV cache full: {n} sequence(s) wanted, {len(self._free)} free")
        slots, self._free = self._free[:n], self._free[n:]
        for s in slots:
            self.lengths[s] = 0
        return slots

    def free(self, slots: list[int]) -> None:
        """Give the sequences back (and whatever memory they held: ``_release``)."""
        for s in slots:
            if s in self._free or s == self.scratch_slot:
                continue
            self._release(s)
            self.lengths[s] = 0
            self._free.append(s)
        self._free.sort()

    def _release(self, slot: int) -> None:
        """A freed sequence's memory: a fixed slot keeps its own."""

    def ensure(self, slot: int, length: int, start: int | None = None) -> None:
        """Room for positions ``0..length-1`` of ``slot``, written from ``start`` (a slot
        always has its ``max_len``; the paged cache of ``kv_pages.py`` takes pages here, and
        copies a page it shares with a fork before it is written)."""
        if length > self.max_len:
            raise RuntimeError(f"context full: {length} > {self.max_len} positions")

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Fork: positions ``0..n-1`` of slot ``src`` into slot ``dst`` (device copies only)."""
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :n].copy_(kc[src, :n])
            vc[dst, :n].copy_(vc[src, :n])
        self.lengths[dst] = n


def _checkpoint_names(module: nn.Module, fused: str, parts: dict[str, int]) -> None:
    """``module.<fused>`` is an ``nn.Linear`` whose output rows are ``parts`` stacked in order
    (name -> rows); ``state_dict()`` shows it as the parts (``<part>.weight``/``.bias``, views
    of the fused tensor) and ``load_state_dict()`` takes the parts and concatenates them."""
    names, sizes = tuple(parts), tuple(parts.values())
    # fused name -> its parts (name -> rows), for code that fills the parts of a fused tensor
    module.checkpoint_parts = {**getattr(module, "checkpoint_parts", {}), fused: dict(parts)}

    def save(mod: nn.Module, state_dict: dict[str, Any], prefix: str, meta: Any) -> None:
        for kind in ("weight", "bias"):
            t = state_dict.pop(f"{prefix}{fused}.{kind}", None)
            if t is not None:
                for name, piece in zip(names, t.split(sizes), strict=True):
                    state_dict[f"{prefix}{name}.{kind}"] = piece

    def load(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in names]
            if all(k in state_dict for k in keys):  # else: reported missing/unexpected by name
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """The attention weights: ``qkv_proj`` (q, k, v stacked; checkpoint names ``q_proj``,
    ``k_proj``, ``v_proj``) and ``o_proj``. The math is in ``layers.py``."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        q = cfg.num_attention_heads * cfg.head_dim
        kv = cfg.num_key_value_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        _checkpoint_names(self, "qkv_proj", {"q_proj": q, "k_proj": kv, "v_proj": kv})


class MLP(nn.Module):
    """The MLP weights: ``gate_up_proj`` (gate, up stacked; checkpoint names ``gate_proj``,
    ``up_proj``) and ``down_proj``. The math is in ``layers.py``."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, cfg.hidden_size, bias=False)
        _checkpoint_names(self, "gate_up_proj", {"gate_proj": i, "up_proj": i})


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.eps = cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def weights(self) -> LayerWeights:
        at, mlp = self.self_attn, self.mlp
        return LayerWeights(
            ln1=self.input_layernorm.weight,
            qkv_w=weight_of(at.qkv_proj),
            qkv_b=at.qkv_proj.bias,
            o_w=weight_of(at.o_proj),
            ln2=self.post_attention_layernorm.weight,
            gu_w=weight_of(mlp.gate_up_proj),
            down_w=weight_of(mlp.down_proj),
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache,
        ctx: AttnContext,
        pre: PreAttention = pre_attention,
        post: PostAttention = post_attention,
    ) -> torch.Tensor:
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        return layer_forward(
            x, self.weights(), kc, vc, ctx, self.eps, self.n_heads, self.n_kv, pre, post
        )


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        if cfg.vocab_shards > 1 and (cfg.tie_word_embeddings or cfg.vocab_size % cfg.vocab_shards):
            raise ValueError(
                f"lm_head split {cfg.vocab_shards} ways needs an untied lm_head and a vocabulary "
                f"({cfg.vocab_size}) that divides (tensor_parallel.splits_vocab)"
            )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.head_rows, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        self.register_buffer("inv_freq", inv, persistent=False)

    def after_to_empty(self) -> None:
        """For a model built on the meta device and then ``to_empty()``: recompute what
        construction computed (the float32 RoPE frequencies) and re-tie ``lm_head`` to the
        embeddings (``to_empty`` gives each module its own tensor)."""
        dev = self.model.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).to(dev)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def weight_bytes(self) -> int:
        """Bytes of the parameters and of the FP8 weight buffers (``fp8.py``)."""
        seen: set[int] = set()
        total = 0
        for p in [*self.parameters(), *self.buffers()]:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    def layer_weights(self) -> list[LayerWeights]:
        return [layer.weights() for layer in self.model.layers]

    def hidden_states(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        *,
        attn_len: int | None = None,
        use_flash: bool = False,
        torch_flash: bool = False,
        pre: PreAttention = pre_attention,
        post: PostAttention = post_attention,
    ) -> torch.Tensor:
        """``embeds [B, T, H]`` at ``positions [B, T]`` of cache rows ``slots [B]`` -> the
        last layer's output ``[B, T, H]`` (before the final norm); writes the new keys/values.

        ``attn_len``: read only the first ``attn_len`` positions of each slot (must exceed
        every position; default the whole cache). ``use_flash``: attention through the
        ``flash_attn`` package (when importable); ``torch_flash``: a one-sequence pre-fill
        through PyTorch's flash kernel (CUDA, half precision). ``pre``/``post``: the layer
        pieces (the runner passes compiled versions of the same functions)."""
        cfg = self.cfg
        length = cache.max_len if attn_len is None else min(attn_len, cache.max_len)
        cos, sin = rope_cos_sin(positions, self.inv_freq, embeds.dtype)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        paged = getattr(cache, "block_table", None)  # a PagedKVCache (kv_pages.py)
        ctx = AttnContext.build(
            positions, slots, cos, sin, length, group,
            max_len=cache.max_len, use_flash=use_flash, torch_flash=torch_flash,
            table=None if paged is None else paged.index_select(0, slots),
            page_size=getattr(cache, "page_size", 0),
        )  # fmt: skip
        x = embeds
        for layer in self.model.layers:
            x = layer(x, cache, ctx, pre, post)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and ``lm_head``: ``[..., vocab_size]``. A tensor-parallel shard whose
        ``lm_head`` is split by vocabulary (``cfg.vocab_shards``) computes its slice and
        gathers the others' (:func:`~realtime.models.tensor_parallel.gather_vocab`), so every
        rank has the same full logits."""
        out = self.lm_head(self.model.norm(hidden))
        if self.cfg.vocab_shards > 1:
            out = gather_vocab(out, self.cfg.vocab_shards)
        return out

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        *,
        last_only: bool = False,
        attn_len: int | None = None,
        use_flash: bool = False,
        torch_flash: bool = False,
    ) -> torch.Tensor:
        """``embeds [B, T, H]`` at ``positions [B, T]`` of cache rows ``slots [B]`` -> logits.

        Writes the new keys/values into the cache. ``last_only``: logits of the last position
        only (``[B, 1, V]``, for prefill). Other arguments as :meth:`hidden_states`.
        """
        x = self.hidden_states(
            embeds, positions, cache, slots,
            attn_len=attn_len, use_flash=use_flash, torch_flash=torch_flash,
        )  # fmt: skip
        if last_only:
            x = x[:, -1:]
        return self.logits(x)


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
