"""The fast one-token step of the Qwen2 decoder: lanes, CUDA graphs, GPU sampling.

A *lane* is one sequence being decoded (a row of the batched step); it points at a KV-cache
slot. The runner keeps every per-lane input of the step in static device buffers (``ids``,
``pos``, ``slots``, sampling parameters) so that one step is a single CUDA-graph replay that
embeds, runs all layers, samples the next token on the GPU, writes it back into ``ids`` and
advances ``pos``. Nothing in a step waits for the host.

Read-back without a sync per token: before each replay the tokens about to be fed (which the
previous step sampled) are copied into a pinned ring buffer and an event is recorded; the host
waits on that event only *after* launching the replay, so the GPU is always one step ahead of
the host and never idles. A token is therefore visible to the host as soon as the step that
sampled it finishes. Forcing a token (``</think>`` at the think budget, a fixed prompt suffix)
is a ``fill_`` of the lane's ``ids`` entry before the next replay.

Graphs are captured per (batch size, attention length bucket, sampling mode); the smallest
captured batch size that fits is replayed, extra rows point at the cache's scratch slot.
Optionally (CUDA) the element-wise work around the matrix products of each layer is compiled
with ``torch.compile`` (RMSNorm, bias, RoPE, SiLU-gate, residuals fused), one compiled
function shared by all layers, and q/k/v and gate/up are fused into single matrix products
(the modules' parameters become views of the fused weights, so state dicts are unchanged).
With ``cuda_graphs=False`` and ``compile=False`` the same code runs eagerly (CPU tests).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from realtime.models.qwen2 import (
    AttnContext,
    KVCache,
    Qwen2ForCausalLM,
    apply_rope,
    attend_cache,
    flash_attn_available,
    rope_cos_sin,
    torch_flash_available,
)

log = logging.getLogger(__name__)

PREFILL_SIZES = (8, 16, 32, 64, 128, 256)  # pre-fill pieces padded to these sizes replay a graph


@dataclass(frozen=True)
class RunnerOptions:
    cuda_graphs: bool = True
    compile: bool = True  # torch.compile the per-layer element-wise pieces (CUDA only)
    attention: str = "auto"  # auto | flash_attn | torch_flash (pre-fill) | sdpa (bool mask only)
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    len_buckets: tuple[int, ...] = ()  # default: 512, 1024, ... up to the cache length
    prefill_chunk: int = 512
    split_reductions: bool = False  # let inductor split small reductions (more kernels)
    triton_attention: bool = True  # the one-kernel decode attention (needs Triton and compile)


@dataclass(frozen=True)
class LaneSampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Lane:
    slot: int
    position: int  # where the next fed token is written
    sampling: LaneSampling = field(default_factory=LaneSampling)


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    ln2: torch.Tensor
    gu_w: torch.Tensor
    down_w: torch.Tensor


def fuse_projections(model: Qwen2ForCausalLM) -> list[_Layer]:
    """Concatenate q/k/v and gate/up weights per layer; the modules keep views of them.
    Idempotent: a model fused once keeps its fused weights."""
    done = getattr(model, "_fused_layers", None)
    if done is not None:
        return list(done)
    layers: list[_Layer] = []
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        projs = (at.q_proj, at.k_proj, at.v_proj)
        with torch.no_grad():
            qkv_w = torch.cat([p.weight for p in projs])
            qkv_b = torch.cat([p.bias for p in projs]) if at.q_proj.bias is not None else None
            gu_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        start = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight = torch.nn.Parameter(qkv_w[start : start + n], requires_grad=False)
            if qkv_b is not None:
                p.bias = torch.nn.Parameter(qkv_b[start : start + n], requires_grad=False)
            start += n
        inter = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight = torch.nn.Parameter(gu_w[:inter], requires_grad=False)
        mlp.up_proj.weight = torch.nn.Parameter(gu_w[inter:], requires_grad=False)
        layers.append(
            _Layer(
                layer.input_layernorm.weight,
                qkv_w,
                qkv_b,
                at.o_proj.weight,
                layer.post_attention_layernorm.weight,
                gu_w,
                mlp.down_proj.weight,
            )
        )
    model._fused_layers = layers  # type: ignore[assignment]
    return layers


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def pre_attention(
    x: torch.Tensor,
    ln: torch.Tensor,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    n_heads: int,
    n_kv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, _ = x.shape
    qkv = F.linear(_rms(x, ln, eps), qkv_w, qkv_b)
    d = qkv.shape[-1] // (n_heads + 2 * n_kv)
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    q = apply_rope(q.reshape(b, t, n_heads, d), cos, sin)
    k = apply_rope(k.reshape(b, t, n_kv, d), cos, sin)
    return q, k, v.reshape(b, t, n_kv, d)


def post_attention(
    x: torch.Tensor,
    attn: torch.Tensor,
    o_w: torch.Tensor,
    ln: torch.Tensor,
    gu_w: torch.Tensor,
    down_w: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    x = x + F.linear(attn, o_w)
    gate, up = F.linear(_rms(x, ln, eps), gu_w).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


def layer_decode(
    x: torch.Tensor,
    delta: torch.Tensor,
    lw: tuple[torch.Tensor | None, ...],
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for one new token per row, attention written as plain reductions
    (or, with ``fused_attention``, the one-kernel ``realtime::decode_attention`` Triton op).

    Meant for ``torch.compile``: the cache rows of each lane are read through their slot index
    inside the fused reduction (no gathered copy of the cache), the new key/value is written in
    place. ``visible [B, L]``: which of the first ``L`` cache positions each row may see.
    The residual stream is ``x + delta`` and the layer returns ``(x', delta')`` unsummed, so
    the last residual add of one layer fuses with the first RMSNorm of the next.
    """
    x = x + delta
    ln1, qkv_w, qkv_b, o_w, ln2, gu_w, down_w = lw
    assert ln1 is not None and qkv_w is not None and o_w is not None
    assert ln2 is not None and gu_w is not None and down_w is not None
    b = x.shape[0]
    q, k, v = pre_attention(x, ln1, qkv_w, qkv_b, cos, sin, eps, n_heads, n_kv)
    kc.index_put_((slots, pos), k[:, 0])
    vc.index_put_((slots, pos), v[:, 0])
    d = q.shape[-1]
    if fused_attention:
        out = torch.ops.realtime.decode_attention(q[:, 0], kc, vc, slots, pos, d**-0.5)
        attn = out.reshape(b, 1, n_heads * d)
    else:
        length = visible.shape[1]
        g = n_heads // n_kv
        keys = kc[slots, :length].float()  # [B, L, Hkv, D]
        vals = vc[slots, :length].float()
        qg = q[:, 0].reshape(b, 1, n_kv, g, d).float() * (d**-0.5)
        scores = (qg * keys[:, :, :, None, :]).sum(-1)  # [B, L, Hkv, g]
        scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=1)
        out = (probs[..., None] * vals[:, :, :, None, :]).sum(1)  # [B, Hkv, g, D]
        attn = out.reshape(b, 1, n_heads * d).to(x.dtype)
    x = x + F.linear(attn, o_w)
    gate, up = F.linear(_rms(x, ln2, eps), gu_w).chunk(2, dim=-1)
    return x, F.linear(F.silu(gate) * up, down_w)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    greedy_only: bool,
) -> torch.Tensor:
    """``logits [B, V]`` -> token ids ``[B]`` on the device, per-row parameters, no host sync.

    Rows with temperature 0 take the argmax. Sampling draws with the exponential-race trick
    (argmax of p / Exp(1)), which needs no cumulative search."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if greedy_only:
        return greedy
    probs = torch.softmax(logits / temperature.clamp_min(1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None]
    k = torch.where(top_k > 0, top_k, probs.shape[-1])[:, None]
    drop = ((cum - sorted_p) > top_p[:, None]) | (ranks >= k)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    noise = torch.empty_like(sorted_p).exponential_()
    pick = (sorted_p / noise).argmax(dim=-1, keepdim=True)
    sampled = order.gather(-1, pick)[:, 0]
    return torch.where(temperature > 0, sampled, greedy)


def _triton_attention() -> bool:
    """Whether the Triton decode-attention op can be used (Triton importable)."""
    try:
        from realtime.models import decode_attention
    except Exception:  # noqa: BLE001 - any import problem means: not available
        return False
    return decode_attention.available()


class DecodeRunner:
    """Prefill and the batched one-token step over a :class:`KVCache`."""

    def __init__(self, model: Qwen2ForCausalLM, cache: KVCache, opts: RunnerOptions) -> None:
        self.model = model
        self.cache = cache
        self.opts = opts
        cfg = model.cfg
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.is_cuda = self.device.type == "cuda"
        self.layers = fuse_projections(model)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.eps = cfg.rms_norm_eps

        want_flash = opts.attention in ("auto", "flash_attn")
        self.use_flash = self.is_cuda and want_flash and flash_attn_available()
        if opts.attention == "flash_attn" and not self.use_flash:
            log.warning("flash_attn requested but not importable (or not on CUDA): using SDPA")
        model.use_flash = self.use_flash
        want_torch_flash = opts.attention in ("auto", "torch_flash")
        self.torch_flash = (
            not self.use_flash
            and want_torch_flash
            and torch_flash_available(self.device, self.dtype)
        )
        model.torch_flash = self.torch_flash
        self.attention_name = "flash_attn" if self.use_flash else self._sdpa_name()
        if self.torch_flash:
            self.attention_name += "; pre-fill: torch flash kernel (varlen, causal bottom-right)"

        self._pre: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = pre_attention
        self._post: Callable[..., torch.Tensor] = post_attention
        self._layer: Callable[..., torch.Tensor] | None = None  # fused decode layer (compiled)
        self.fused_attention = False  # the decode step's attention is the Triton kernel
        self.compiled = False
        if opts.compile and self.is_cuda:
            try:
                import torch._dynamo as dynamo
                import torch._inductor.config as inductor_config

                inductor_config.split_reductions = opts.split_reductions

                for name in ("recompile_limit", "cache_size_limit"):
                    if hasattr(dynamo.config, name):
                        setattr(dynamo.config, name, max(getattr(dynamo.config, name), 32))
                self._pre = torch.compile(pre_attention, fullgraph=True, dynamic=False)
                self._post = torch.compile(post_attention, fullgraph=True, dynamic=False)
                if not self.use_flash:
                    self._layer = torch.compile(layer_decode, fullgraph=True, dynamic=False)
                    self.fused_attention = opts.triton_attention and _triton_attention()
                    if self.fused_attention:
                        self.attention_name += "; decode step: triton decode_attention kernel"
                self.compiled = True
            except Exception as exc:  # noqa: BLE001 - fall back to eager pieces
                log.warning("torch.compile unavailable (%s): eager layer pieces", exc)

        fits = tuple(b for b in sorted(opts.batch_sizes) if b <= cache.max_batch)
        self.batch_sizes = (
            fits if fits and fits[-1] == cache.max_batch else (*fits, cache.max_batch)
        )
        max_b = self.batch_sizes[-1]
        dev = self.device
        self.ids = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.slots = torch.full((max_b,), cache.scratch_slot, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(max_b, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(max_b, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.lanes: list[Lane] = []
        hidden, vocab = cfg.hidden_size, cfg.vocab_size
        self._pf_emb = torch.zeros(PREFILL_SIZES[-1], hidden, dtype=self.dtype, device=dev)
        self._pf_pos = torch.zeros(PREFILL_SIZES[-1], dtype=torch.long, device=dev)
        self._pf_slot = torch.full((1,), cache.scratch_slot, dtype=torch.long, device=dev)
        self._pf_last = torch.zeros(1, dtype=torch.long, device=dev)
        self._pf_logits = torch.zeros(1, vocab, dtype=torch.float32, device=dev)
        self._pf_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        buckets = opts.len_buckets or self._default_buckets(cache.max_len)
        self.buckets = tuple(sorted(b for b in buckets if b <= cache.max_len)) or (cache.max_len,)
        if self.buckets[-1] != cache.max_len:
            self.buckets = (*self.buckets, cache.max_len)
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self._pool = None
        ring = 8
        pin = self.is_cuda
        self._ring = torch.zeros((ring, max_b), dtype=torch.long, pin_memory=pin)
        self._events = [torch.cuda.Event() if self.is_cuda else None for _ in range(ring)]
        self._step_no = 0

    # ----- setup -----------------------------------------------------------------------------
    @staticmethod
    def _default_buckets(max_len: int) -> tuple[int, ...]:
        out, n = [], 512
        while n < max_len:
            out.append(n)
            n *= 2
        return (*out, max_len)

    def _sdpa_name(self) -> str:
        if not self.is_cuda:
            return "sdpa(cpu)"
        return "sdpa(efficient, grouped-query bool mask)"

    def _sdpa_ctx(self) -> AbstractContextManager[object]:
        if not self.is_cuda or self.use_flash:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    # ----- prefill -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Write ``embeds [T, H]`` at positions ``start..`` of ``slot``; logits ``[V]`` of the
        last position (float32, on the device). Pieces of up to ``max(PREFILL_SIZES)`` tokens
        replay a graph captured for the next size up (padding rows write junk keys beyond the
        slot's length, which no query can see before they are overwritten)."""
        t = embeds.shape[0]
        if start + t > self.cache.max_len:
            raise RuntimeError(f"context full: {start + t} > {self.cache.max_len} positions")
        logits: torch.Tensor | None = None
        i = 0
        while i < t:
            n = min(t - i, self.opts.prefill_chunk)
            piece = embeds[i : i + n].to(self.dtype)
            tb = next((b for b in PREFILL_SIZES if b >= n), None)
            graphs = self.is_cuda and self.opts.cuda_graphs
            if graphs and tb is not None and start + i + tb <= self.cache.max_len:
                logits = self._prefill_graphed(piece, slot, start + i, tb)
            else:
                logits = self._prefill_eager(piece, slot, start + i)
            i += n
        self.cache.lengths[slot] = start + t
        assert logits is not None
        return logits

    def _prefill_eager(self, piece: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        n = piece.shape[0]
        pos = torch.arange(start, start + n, device=self.device)[None]
        slots = torch.tensor([slot], device=self.device)
        with self._sdpa_ctx():
            out = self.model(
                piece[None],
                pos,
                self.cache,
                slots,
                last_only=True,
                attn_len=self._bucket_or_round(start + n),
            )
        return out[0, -1].float()

    def _prefill_graphed(self, piece: torch.Tensor, slot: int, start: int, tb: int) -> torch.Tensor:
        n = piece.shape[0]
        attn_len = self.buckets[bisect.bisect_left(self.buckets, start + tb)]
        self._pf_emb[:n].copy_(piece)
        torch.arange(start, start + tb, device=self.device, out=self._pf_pos[:tb])
        self._pf_slot.fill_(slot)
        self._pf_last.fill_(n - 1)
        key = (tb, attn_len)
        graph = self._pf_graphs.get(key)
        if graph is None:
            graph = self._capture_prefill(key)
        graph.replay()
        return self._pf_logits[0].clone()

    def _forward_prefill(self, tb: int, attn_len: int) -> None:
        x = self._pf_emb[:tb][None]
        positions = self._pf_pos[:tb][None]
        cos, sin = rope_cos_sin(positions, self.model.inv_freq, x.dtype)
        x = self._layers_unfused(x, positions, self._pf_slot, cos, sin, attn_len)
        last = x[0].index_select(0, self._pf_last)
        self._pf_logits.copy_(self.model.lm_head(self.model.model.norm(last)).float())

    def _capture_prefill(self, key: tuple[int, int]) -> torch.cuda.CUDAGraph:
        tb, attn_len = key
        saved = [b.clone() for b in (self._pf_pos, self._pf_slot)]
        self._pf_slot.fill_(self.cache.scratch_slot)
        self._pf_pos.zero_()
        graph = self._record(lambda: self._forward_prefill(tb, attn_len))
        self._pf_pos.copy_(saved[0])
        self._pf_slot.copy_(saved[1])
        self._pf_graphs[key] = graph
        return graph

    def _record(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._sdpa_ctx():
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self._sdpa_ctx():
            fn()
        return graph

    def _bucket_or_round(self, n: int) -> int:
        return min(self.cache.max_len, -(-n // 64) * 64)

    # ----- lanes -------------------------------------------------------------------------------
    def add_lane(
        self,
        slot: int,
        position: int,
        sampling: LaneSampling,
        *,
        logits: torch.Tensor | None = None,
        token: int | None = None,
    ) -> int:
        """A new row: its first token is ``token`` or sampled from ``logits`` (on the device)."""
        k = len(self.lanes)
        if k >= len(self.ids):
            raise RuntimeError("no free lane")
        self.lanes.append(Lane(slot, position, sampling))
        self.slots[k].fill_(slot)
        self.pos[k].fill_(position)
        self.temperature[k].fill_(sampling.temperature)
        self.top_p[k].fill_(sampling.top_p)
        self.top_k[k].fill_(sampling.top_k)
        if token is not None:
            self.ids[k].fill_(token)
        else:
            assert logits is not None
            first = sample_tokens(
                logits[None],
                self.temperature[k : k + 1],
                self.top_p[k : k + 1],
                self.top_k[k : k + 1],
                greedy_only=sampling.temperature <= 0,
            )
            self.ids[k : k + 1].copy_(first)
        return k

    def remove_lane(self, k: int) -> None:
        """Drop lane ``k``; the last lane moves into its row (device copies, no sync)."""
        last = len(self.lanes) - 1
        if k != last:
            for buf in (self.ids, self.pos, self.slots, self.temperature, self.top_p, self.top_k):
                buf[k].copy_(buf[last])
            self.lanes[k] = self.lanes[last]
        self.lanes.pop()
        self.slots[last].fill_(self.cache.scratch_slot)

    @torch.no_grad()
    def inject(self, k: int, embeds: torch.Tensor) -> None:
        """Insert ``embeds [T, H]`` into lane ``k``'s sequence at its current position (a
        pre-fill), discarding what its last step sampled; the lane goes on from there."""
        lane = self.lanes[k]
        logits = self.prefill(embeds, lane.slot, lane.position)
        lane.position += embeds.shape[0]
        self.pos[k].fill_(lane.position)
        first = sample_tokens(
            logits[None],
            self.temperature[k : k + 1],
            self.top_p[k : k + 1],
            self.top_k[k : k + 1],
            greedy_only=lane.sampling.temperature <= 0,
        )
        self.ids[k : k + 1].copy_(first)

    def force(self, k: int, token: int) -> None:
        """Feed ``token`` to lane ``k`` at the next step instead of what was sampled."""
        self.ids[k].fill_(token)

    def clear(self) -> None:
        while self.lanes:
            self.remove_lane(len(self.lanes) - 1)

    # ----- the step ----------------------------------------------------------------------------
    def _forward_step(self, bs: int, attn_len: int, greedy_only: bool) -> None:
        ids, pos, slots = self.ids[:bs], self.pos[:bs], self.slots[:bs]
        x = self.model.embed(ids)[:, None]
        positions = pos[:, None]
        cos, sin = rope_cos_sin(positions, self.model.inv_freq, x.dtype)
        if self._layer is not None:
            visible = torch.arange(attn_len, device=x.device)[None] <= pos[:, None]
            delta = torch.zeros_like(x)
            for i, lw in enumerate(self.layers):
                weights = (lw.ln1, lw.qkv_w, lw.qkv_b, lw.o_w, lw.ln2, lw.gu_w, lw.down_w)
                x, delta = self._layer(
                    x, delta, weights, self.cache.k[i], self.cache.v[i], cos, sin, pos, slots,
                    visible, self.eps, self.n_heads, self.n_kv, self.fused_attention,
                )  # fmt: skip
            x = x + delta
        else:
            x = self._layers_unfused(x, positions, slots, cos, sin, attn_len)
        logits = self.model.lm_head(self.model.model.norm(x[:, 0]))
        nxt = sample_tokens(
            logits, self.temperature[:bs], self.top_p[:bs], self.top_k[:bs], greedy_only
        )
        ids.copy_(nxt)
        pos.add_(1)

    def _layers_unfused(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_len: int,
    ) -> torch.Tensor:
        ctx = AttnContext.build(
            positions, slots, cos, sin, attn_len, self.group, max_len=self.cache.max_len,
            use_flash=self.use_flash, torch_flash=self.torch_flash,
        )  # fmt: skip
        for i, lw in enumerate(self.layers):
            q, k, v = self._pre(
                x, lw.ln1, lw.qkv_w, lw.qkv_b, cos, sin, self.eps, self.n_heads, self.n_kv
            )
            attn = attend_cache(q, k, v, self.cache.k[i], self.cache.v[i], ctx)
            x = self._post(x, attn, lw.o_w, lw.ln2, lw.gu_w, lw.down_w, self.eps)
        return x

    def _key(self) -> tuple[int, int, bool]:
        n = len(self.lanes)
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        need = max(lane.position for lane in self.lanes) + 1
        if need > self.cache.max_len:
            raise RuntimeError(f"context full: {need} > {self.cache.max_len} positions")
        attn_len = self.buckets[bisect.bisect_left(self.buckets, need)]
        greedy = all(lane.sampling.temperature <= 0 for lane in self.lanes)
        return bs, attn_len, greedy

    def _capture(self, key: tuple[int, int, bool]) -> torch.cuda.CUDAGraph:
        bs, attn_len, greedy = key
        saved = [b.clone() for b in (self.ids, self.pos, self.slots)]
        # capture on the scratch slot so that nothing real is overwritten
        self.slots[:bs].fill_(self.cache.scratch_slot)
        self.pos[:bs].fill_(0)
        graph = self._record(lambda: self._forward_step(bs, attn_len, greedy))
        for buf, old in zip((self.ids, self.pos, self.slots), saved, strict=True):
            buf.copy_(old)
        self._graphs[key] = graph
        return graph

    @torch.no_grad()
    def capture_all(self, greedy: bool = True, sample: bool = False) -> int:
        """Capture every (batch size, bucket) graph now (warm-up), return how many."""
        if not (self.is_cuda and self.opts.cuda_graphs):
            return 0
        for tb in PREFILL_SIZES[:3]:
            for attn_len in self.buckets[:2]:
                if (tb, attn_len) not in self._pf_graphs:
                    self._capture_prefill((tb, attn_len))
        modes = [m for m, on in ((True, greedy), (False, sample)) if on]
        for bs in self.batch_sizes:
            for attn_len in self.buckets:
                for g in modes:
                    if (bs, attn_len, g) not in self._graphs:
                        self._capture((bs, attn_len, g))
        return len(self._graphs) + len(self._pf_graphs)

    @torch.no_grad()
    def step(self) -> list[int]:
        """Run one step for all lanes; returns the token each lane was fed at this step
        (the one the previous step sampled or that was forced)."""
        if not self.lanes:
            raise RuntimeError("step with no lanes")
        n = len(self.lanes)
        key = self._key()
        if n < key[0]:
            self.pos[n : key[0]].fill_(0)  # padding rows write position 0 of the scratch slot
        slot = self._step_no % len(self._ring)
        self._step_no += 1
        row = self._ring[slot]
        row[:n].copy_(self.ids[:n], non_blocking=True)
        ev = self._events[slot]
        if ev is not None:
            ev.record()
        if self.is_cuda and self.opts.cuda_graphs:
            graph = self._graphs.get(key) or self._capture(key)
            graph.replay()
        else:
            with self._sdpa_ctx():
                self._forward_step(*key)
        if ev is not None:
            ev.synchronize()  # the copy above, i.e. the previous step, is done
        for lane in self.lanes:
            lane.position += 1
            self.cache.lengths[lane.slot] = lane.position
        return row[:n].tolist()

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
