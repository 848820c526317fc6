"""How the decode runner runs the decoder's layers on its device: which attention path, which
pieces are compiled, and CUDA-graph recording. The model is only read, never changed.

The layer math is that of ``layers.py`` throughout; this module only decides how it is run:

* the attention path of pre-fill: ``flash_attn`` (package), PyTorch's flash kernel in its
  variable-length form, or SDPA with a bool mask (efficient or math backend);
* with ``compile`` on CUDA: :func:`~realtime.models.layers.pre_attention` and
  :func:`~realtime.models.layers.post_attention` compiled for pre-fill pieces of a graphed
  size, and the whole one-token layer :func:`~realtime.models.layers.layer_decode` compiled
  for the step (one compiled function shared by all layers: RMSNorm, bias, RoPE, SiLU-gate
  and residuals fused around the matrix products), its attention optionally the Triton
  kernel ``realtime::decode_attention``.

Process-wide torch settings are changed in one place only, :func:`configure_compiler`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from realtime.models.attention import flash_attn_available, torch_flash_available
from realtime.models.fp8 import has_weight_only_fp8
from realtime.models.layers import (
    PostAttention,
    PreAttention,
    layer_decode,
    post_attention,
    pre_attention,
    rope_cos_sin,
)
from realtime.models.qwen2 import KVCache, Qwen2ForCausalLM

log = logging.getLogger(__name__)


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
    autotune_gemm: bool = False  # inductor's max_autotune_gemm: time cuBLAS against Triton GEMMs
    riders: bool = False  # pre-fill pieces ride in the step's spare rows (decode.Rider)


# Each (batch size, attention-length bucket, greedy or sampled) step is its own compiled graph:
# 8 batch sizes (engine.max_batch 96) x 5 buckets (8192 positions) x 2 already pass 64.
RECOMPILE_LIMIT = 256
_compiler_configured = False


def configure_compiler() -> None:
    """The one place where this project changes process-wide torch settings. Called by every
    runner that compiles; it acts once per process.

    It raises dynamo's per-function recompile limit (``recompile_limit``, called
    ``cache_size_limit`` in older torch) to at least ``RECOMPILE_LIMIT``. The runner compiles
    with ``dynamic=False``, so each shape is its own compiled graph: the decode layer once per
    (batch size, attention-length bucket) and the pre-fill pieces once per graphed pre-fill
    size, more than the default limit of 8. Past the limit dynamo quietly runs the function
    uncompiled, which would make those steps several times slower.

    Inductor settings (``split_reductions``) are not global: they are passed to each
    ``torch.compile`` call as ``options``."""
    global _compiler_configured
    if _compiler_configured:
        return
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), RECOMPILE_LIMIT))
    _compiler_configured = True


def _triton_attention() -> bool:
    """Whether the Triton decode-attention op can be used (Triton importable)."""
    try:
        from realtime.models import decode_attention
    except Exception:  # noqa: BLE001 - any import problem means: not available
        return False
    return decode_attention.available()


def flat_pieces(pre: PreAttention, post: PostAttention) -> tuple[PreAttention, PostAttention]:
    """``pre``/``post`` over ``[B, T]`` rows as one row of ``B*T`` tokens. Everything in them
    is per token (norms, products, RoPE with each token's own angles), so the result is the
    same; a batched pre-fill of ``B`` pieces padded to ``T`` then runs the compiled pieces of
    a one-sequence pre-fill of ``B*T`` positions, compiled once per size and shared with it,
    instead of one compilation per ``(B, T)``. Only attention sees the rows apart."""

    def flat_pre(
        x: torch.Tensor, ln: torch.Tensor, w: Any, b: Any, cos: torch.Tensor,
        sin: torch.Tensor, eps: float, n_heads: int, n_kv: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        rows, t, h = x.shape
        one = (1, rows * t)
        q, k, v = pre(
            x.reshape(*one, h), ln, w, b, cos.reshape(*one, *cos.shape[2:]),
            sin.reshape(*one, *sin.shape[2:]), eps, n_heads, n_kv,
        )  # fmt: skip
        return tuple(a.reshape(rows, t, *a.shape[2:]) for a in (q, k, v))  # type: ignore[return-value]

    def flat_post(
        x: torch.Tensor, attn: torch.Tensor, o_w: Any, ln: torch.Tensor, gu_w: Any,
        down_w: Any, eps: float,
    ) -> torch.Tensor:  # fmt: skip
        rows, t, h = x.shape
        out = post(
            x.reshape(1, rows * t, h), attn.reshape(1, rows * t, -1), o_w, ln, gu_w, down_w, eps
        )
        return out.reshape(rows, t, h)

    return flat_pre, flat_post


class DecoderBackend:
    """The decoder's layers as one runner runs them (attention path, compiled pieces)."""

    def __init__(self, model: Qwen2ForCausalLM, cache: KVCache, opts: RunnerOptions) -> None:
        self.model = model
        self.cache = cache
        cfg = model.cfg
        emb = model.model.embed_tokens.weight  # (lm_head may be FP8: fp8.quantize_lm_head_)
        self.device, self.dtype = emb.device, emb.dtype
        self.is_cuda = self.device.type == "cuda"
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.eps = cfg.rms_norm_eps

        self.table = getattr(cache, "block_table", None)  # a paged cache (kv_pages.py)
        page_ok = self.table is None or getattr(cache, "page_size", 0) % 256 == 0
        want_flash = opts.attention in ("auto", "flash_attn")
        self.use_flash = self.is_cuda and want_flash and flash_attn_available() and page_ok
        if opts.attention == "flash_attn" and not self.use_flash:
            log.warning("flash_attn requested but not importable (or not on CUDA): using SDPA")
        want_torch_flash = opts.attention in ("auto", "torch_flash")
        self.torch_flash = (
            not self.use_flash
            and self.table is None  # its variable-length form reads contiguous slots
            and want_torch_flash
            and torch_flash_available(self.device, self.dtype)
        )
        self.attention_name = "flash_attn" if self.use_flash else self._sdpa_name()
        if self.table is not None:
            self.attention_name += f"; paged KV ({cache.page_size} positions a page)"
        if self.torch_flash:
            self.attention_name += "; pre-fill: torch flash kernel (varlen, causal bottom-right)"

        self.pre: PreAttention = pre_attention
        self.post: PostAttention = post_attention
        self.layer: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None  # step
        self.fused_attention = False  # the step's attention is the Triton kernel
        self.compiled = False
        if opts.compile and self.is_cuda:
            try:
                configure_compiler()
                options = {"split_reductions": opts.split_reductions}
                if opts.autotune_gemm:  # each product's kernel picked by timing (slow compile)
                    options["max_autotune_gemm"] = True
                if has_weight_only_fp8(model):  # one-row products become fused GEMVs (fp8.py)
                    options["coordinate_descent_tuning"] = True
                kw: dict[str, Any] = {"fullgraph": True, "dynamic": False, "options": options}
                self.pre = torch.compile(pre_attention, **kw)
                self.post = torch.compile(post_attention, **kw)
                if not self.use_flash:
                    self.layer = torch.compile(layer_decode, **kw)
                    self.fused_attention = (
                        opts.triton_attention
                        and _triton_attention()
                        and (self.table is None or cache.page_size % 64 == 0)
                    )
                    if self.fused_attention:
                        self.attention_name += "; decode step: triton decode_attention kernel"
                self.compiled = True
            except Exception as exc:  # noqa: BLE001 - fall back to eager pieces
                log.warning("torch.compile unavailable (%s): eager layer pieces", exc)
        self._pool: Any = None

    def _sdpa_name(self) -> str:
        if not self.is_cuda:
            return "sdpa(cpu)"
        return "sdpa(efficient, grouped-query bool mask)"

    def sdpa_ctx(self) -> AbstractContextManager[object]:
        if not self.is_cuda or self.use_flash:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def record(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Warm ``fn`` up on a side stream, then capture it (all graphs share one pool)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.sdpa_ctx():
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), self.sdpa_ctx():
            fn()
        return graph

    def hidden(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attn_len: int,
        *,
        compiled: bool = True,
        flat: bool = False,
    ) -> torch.Tensor:
        """The module path (:meth:`Qwen2ForCausalLM.hidden_states`) with this runner's
        attention choice; ``compiled``: with the compiled pre/post pieces (only for shapes
        that recur: graphed pre-fill sizes, step batch sizes). ``flat``: the per-token pieces
        see the ``B`` rows as one row of ``B*T`` tokens (:func:`flat_pieces`)."""
        pre, post = (self.pre, self.post) if compiled else (pre_attention, post_attention)
        if flat and x.shape[0] > 1:
            pre, post = flat_pieces(pre, post)
        return self.model.hidden_states(
            x, positions, self.cache, slots, attn_len=attn_len,
            use_flash=self.use_flash, torch_flash=self.torch_flash, pre=pre, post=post,
        )  # fmt: skip

    def step_hidden(
        self, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, attn_len: int
    ) -> torch.Tensor:
        """One new token per row: ``x [B, 1, H]`` at ``pos [B]`` of ``slots [B]`` -> the last
        layer's output ``[B, 1, H]``, through :func:`layer_decode` (compiled) when there is
        one, else the module path."""
        if self.layer is None:
            return self.hidden(x, pos[:, None], slots, attn_len)
        cos, sin = rope_cos_sin(pos[:, None], self.model.inv_freq, x.dtype)
        visible = torch.arange(attn_len, device=x.device)[None] <= pos[:, None]
        delta = torch.zeros_like(x)
        table = None if self.table is None else self.table.index_select(0, slots)
        for i, lw in enumerate(self.model.layer_weights()):
            x, delta = self.layer(
                x, delta, lw, self.cache.k[i], self.cache.v[i], cos, sin, pos, slots,
                visible, self.eps, self.n_heads, self.n_kv, self.fused_attention, table,
            )  # fmt: skip
        return x + delta
