"""FP8 (e4m3) decoder weights: quantisation and the matrix product.

A weight ``W [N, K]`` is stored as ``float8_e4m3fn`` with one float32 scale per output row
(channel), ``W ~= Wq * scale[:, None]``; an activation ``x [M, K]`` is quantised at run time
with one scale per token (row). The product is

    y = (xq @ Wq.T) * sx[:, None] * scale[None, :]

On CUDA this is one ``torch._scaled_mm`` call with row-wise scales (both scales applied by
the kernel's epilogue, bf16 out), or, with ``rowwise=False``, a per-tensor activation scale
(one ``amax`` over the batch) and the weight's row scales applied after the product; both
capture in CUDA graphs and trace under ``torch.compile``. On the CPU (tests) the same
quantised values are multiplied in float32: the quantisation error is the same, only the
accumulation differs.

Only the decoder layers' projections are quantised (q/k/v, o, gate/up, down); embeddings,
norms, biases and ``lm_head`` stay in the model's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_EPS = 1e-12
# Hopper's fast FP8 accumulation (as inference servers use it); the CPU emulation accumulates
# in float32 throughout.
FAST_ACCUM = True


ACTIVATIONS = ("auto", "token", "tensor", "none")


class Fp8Weight(NamedTuple):
    """A quantised weight as the layer functions receive it (in place of a tensor).

    ``act``: how the activations are handled: ``token`` (FP8, one scale per token,
    ``_scaled_mm`` with row-wise scales), ``tensor`` (FP8, one scale per call, the weight's
    row scales applied after a per-tensor ``_scaled_mm``), ``none`` (weight-only: the FP8
    weight is widened inside the product; compiled with inductor's coordinate-descent tuning
    a one-row product becomes one GEMV kernel reading the FP8 bytes), ``auto``: ``tensor``
    for one row (the batch-1 step: for one token a per-tensor scale *is* a per-token scale,
    and cuBLAS's per-tensor FP8 kernel was the faster one on an H100), else ``token``.
    """

    q: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # [N] float32: W ~= q * scale[:, None]
    act: str = "auto"


def quantize_weight(w: torch.Tensor, act: str = "auto", rows: int = 4096) -> Fp8Weight:
    """``w [N, K]`` -> FP8 with one scale per output row (in blocks of ``rows`` rows, so a
    large matrix needs little float32 scratch)."""
    if w.dim() != 2:
        raise ValueError(f"FP8 weights are 2-D, got shape {tuple(w.shape)}")
    if w.shape[1] % 16 or w.shape[0] % 16:
        raise ValueError(f"FP8 weight shape {tuple(w.shape)}: both sides must divide by 16")
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], rows):
        block = w[i : i + rows].float()
        s = block.abs().amax(dim=1).clamp(min=_EPS) / FP8_MAX
        q[i : i + rows] = (block / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        scale[i : i + rows] = s
    return Fp8Weight(q, scale, act)


def dequantize_weight(w: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (w.q.float() * w.scale[:, None]).to(dtype)


def quantize_activation(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (FP8 values, float32 scales ``[M, 1]`` or ``[1, 1]``)."""
    x32 = x.float()
    if rowwise:
        amax = x32.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x32.abs().amax().reshape(1, 1)
    s = amax.clamp(min=_EPS) / FP8_MAX
    return (x32 / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a quantised ``W``: ``x [..., K]`` -> ``[..., N]`` in
    ``x``'s dtype."""
    if w.act not in ACTIVATIONS:
        raise ValueError(f"FP8 activation mode {w.act!r}: one of {ACTIVATIONS}")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    act = w.act if w.act != "auto" else ("tensor" if x2.shape[0] == 1 else "token")
    if act == "none":  # weight-only: x times the widened weight, scaled per output channel
        y = torch.nn.functional.linear(x2, w.q.to(x.dtype)) * w.scale.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, w.q.shape[0])
    xq, sx = quantize_activation(x2, act == "token")
    if x.is_cuda:
        if act == "token":
            y = torch._scaled_mm(
                xq, w.q.t(), scale_a=sx, scale_b=w.scale[None, :], out_dtype=torch.bfloat16,
                use_fast_accum=FAST_ACCUM,
            )  # fmt: skip
        else:
            one = torch.ones((), device=x.device, dtype=torch.float32)
            y = torch._scaled_mm(
                xq, w.q.t(), scale_a=sx.reshape(()), scale_b=one, out_dtype=torch.bfloat16,
                use_fast_accum=FAST_ACCUM,
            )  # fmt: skip
            y = y * w.scale[None, :]
        y = y.to(x.dtype)
    else:  # emulation: the same FP8 values, float32 products
        y = ((xq.float() @ w.q.float().t()) * sx * w.scale[None, :]).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w.q.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor | Fp8Weight, bias: torch.Tensor | None = None):
    """``F.linear`` for a plain or a quantised weight (what the layer functions call)."""
    if isinstance(w, Fp8Weight):
        return fp8_linear(x, w, bias)
    return torch.nn.functional.linear(x, w, bias)


class Fp8Linear(nn.Module):
    """Holds a quantised ``nn.Linear`` (buffers ``weight_fp8``, ``weight_scale``; the bias
    stays a parameter in the original dtype)."""

    def __init__(self, lin: nn.Linear, act: str = "auto") -> None:
        super().__init__()
        packed = quantize_weight(lin.weight.detach(), act)
        self.register_buffer("weight_fp8", packed.q)
        self.register_buffer("weight_scale", packed.scale)
        self.act = act
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    @property
    def packed(self) -> Fp8Weight:
        return Fp8Weight(self.weight_fp8, self.weight_scale, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.packed, self.bias)


DECODER_PROJECTIONS = (
    ("self_attn", "qkv_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_up_proj"),
    ("mlp", "down_proj"),
)


@torch.no_grad()
def quantize_decoder_(model: nn.Module, act: str = "auto") -> int:
    """Replace every decoder layer's projections of a ``Qwen2ForCausalLM`` by
    :class:`Fp8Linear`, layer by layer (each bf16 weight is freed as soon as its FP8 copy
    exists, so the peak is the bf16 model plus one matrix). Returns the bytes saved."""
    saved = 0
    for layer in model.model.layers:  # type: ignore[union-attr]
        for parent_name, name in DECODER_PROJECTIONS:
            parent = getattr(layer, parent_name)
            lin = getattr(parent, name)
            if isinstance(lin, Fp8Linear):
                continue
            before = lin.weight.numel() * lin.weight.element_size()
            q = Fp8Linear(lin, act)
            setattr(parent, name, q)
            saved += before - q.weight_fp8.numel() - 4 * q.weight_scale.numel()
            del lin
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()
    return saved


def has_weight_only_fp8(model: nn.Module) -> bool:
    """Whether some FP8 projection of ``model`` is weight-only (``act="none"``)."""
    return any(isinstance(m, Fp8Linear) and m.act == "none" for m in model.modules())


def set_activation_mode(model: nn.Module, act: str) -> None:
    """Change how every FP8 projection of ``model`` treats its activations (``ACTIVATIONS``)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"FP8 activation mode {act!r}: one of {ACTIVATIONS}")
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.act = act


def weight_of(lin: nn.Module) -> torch.Tensor | Fp8Weight:
    """What the layer functions take for a projection: the tensor or the packed FP8."""
    if isinstance(lin, Fp8Linear):
        return lin.packed
    return lin.weight  # type: ignore[return-value]
