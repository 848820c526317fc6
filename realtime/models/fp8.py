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

A *static* activation scale (``act="static"``) is one float32 number per projection, fixed
at load by :func:`calibrate_activations_` (a pass over calibration text records each
projection's largest input, times a margin): the activation's quantisation is then a plain
element-wise cast with no ``amax`` reduction before it (at batch 1 on an H100 the dynamic
scales' reductions cost about 1.2 ms of a 15 ms step, ``docs/benchmarks.md``). An input
beyond the calibrated range is clipped to it.

By default only the decoder layers' projections are quantised (q/k/v, o, gate/up, down);
embeddings, norms, biases and ``lm_head`` stay in the model's dtype. :func:`quantize_lm_head_`
quantises ``lm_head`` too (its own FP8 copy when it is tied to the embeddings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_EPS = 1e-12
# Hopper's fast FP8 accumulation (as inference servers use it); the CPU emulation accumulates
# in float32 throughout.
FAST_ACCUM = True


ACTIVATIONS = ("auto", "token", "tensor", "none", "static", "observe")


class Fp8Weight(NamedTuple):
    """A quantised weight as the layer functions receive it (in place of a tensor).

    ``act``: how the activations are handled: ``token`` (FP8, one scale per token,
    ``_scaled_mm`` with row-wise scales), ``tensor`` (FP8, one scale per call, the weight's
    row scales applied after a per-tensor ``_scaled_mm``), ``none`` (weight-only: the FP8
    weight is widened inside the product; compiled with inductor's coordinate-descent tuning
    a one-row product becomes one GEMV kernel reading the FP8 bytes), ``auto``: ``tensor``
    for one row (the batch-1 step: for one token a per-tensor scale *is* a per-token scale,
    and cuBLAS's per-tensor FP8 kernel was the faster one on an H100), else ``token``;
    ``static``: FP8 with the fixed scale ``input_scale`` (calibrated; the per-tensor kernel
    for one row, the row-wise one with that scale repeated for more); ``observe``: as
    ``auto``, and the largest ``|x|`` seen is kept in ``input_amax`` (calibration).
    """

    q: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # [N] float32: W ~= q * scale[:, None]
    act: str = "auto"
    input_scale: torch.Tensor | None = None  # [] float32: the static activation scale
    input_amax: torch.Tensor | None = None  # [] float32: the largest |x| observed


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


def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` -> FP8 values ``x / scale`` (``scale``: a float32 number; beyond the
    calibrated range values are clipped to +-448). Element-wise: no reduction."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


_UNITS: dict[torch.device, torch.Tensor] = {}


def _unit(device: torch.device) -> torch.Tensor:
    """A float32 1 on ``device``, made once: the per-tensor kernel's weight scale. (Made in
    the step, it was a kernel of its own before each product: 0.23 ms of a 13.7 ms FP8 step,
    ``serving-gpu-profile-static-head.json``.)"""
    one = _UNITS.get(device)
    if one is None:
        one = _UNITS[device] = torch.ones((), device=device, dtype=torch.float32)
    return one


def scaled_product(
    xq: torch.Tensor, sx: torch.Tensor, w: Fp8Weight, rowwise: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """``(xq @ w.q.T) * sx * w.scale`` through ``torch._scaled_mm`` (what runs on CUDA).

    ``rowwise``: ``sx [M, 1]`` and the weight's row scales both go to the kernel's epilogue
    (cuBLAS's row-wise FP8 kernels); otherwise ``sx`` is one number (``[]`` or ``[1, 1]``),
    the per-tensor kernel runs and the weight's row scales multiply its output."""
    if rowwise:
        y = torch._scaled_mm(
            xq, w.q.t(), scale_a=sx, scale_b=w.scale[None, :], out_dtype=torch.bfloat16,
            use_fast_accum=FAST_ACCUM,
        )  # fmt: skip
        return y.to(out_dtype)
    y = torch._scaled_mm(
        xq, w.q.t(), scale_a=sx.reshape(()), scale_b=_unit(xq.device), out_dtype=torch.bfloat16,
        use_fast_accum=FAST_ACCUM,
    )  # fmt: skip
    return (y * w.scale[None, :]).to(out_dtype)


def _static_scale(w: Fp8Weight) -> torch.Tensor:
    if w.input_scale is None:
        raise ValueError("FP8 activation mode 'static' needs a calibrated input_scale")
    return w.input_scale


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a quantised ``W``: ``x [..., K]`` -> ``[..., N]`` in
    ``x``'s dtype."""
    if w.act not in ACTIVATIONS:
        raise ValueError(f"FP8 activation mode {w.act!r}: one of {ACTIVATIONS}")
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    act = w.act
    if act == "observe":  # calibration (eager): keep the largest |x|, then run as auto
        if w.input_amax is None:
            raise ValueError("FP8 activation mode 'observe' needs an input_amax buffer")
        if m:
            w.input_amax.copy_(torch.maximum(w.input_amax, x2.detach().abs().amax().float()))
        act = "auto"
    if act == "auto":
        act = "tensor" if m == 1 else "token"
    if act == "none":  # weight-only: x times the widened weight, scaled per output channel
        y = torch.nn.functional.linear(x2, w.q.to(x.dtype)) * w.scale.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, w.q.shape[0])
    if act == "static":
        s = _static_scale(w)
        xq = quantize_activation_static(x2, s)
        # one row: the per-tensor kernel; more: the row-wise one, the one scale repeated
        rowwise = m > 1
        sx = s.reshape(1, 1).expand(m, 1).contiguous() if rowwise else s.reshape(1, 1)
    else:
        rowwise = act == "token"
        xq, sx = quantize_activation(x2, rowwise)
    if x.is_cuda:
        y = scaled_product(xq, sx, w, rowwise, x.dtype)
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
    stays a parameter in the original dtype). ``input_scale`` is the static activation scale
    (0 until :func:`calibrate_activations_` sets it), ``input_amax`` what calibration saw."""

    def __init__(self, lin: nn.Linear, act: str = "auto", pad_rows: bool = False) -> None:
        """``pad_rows``: an output count that does not divide by 16 (``_scaled_mm`` needs it)
        is padded with zero rows, and the output cut back to ``out_features`` (no bias)."""
        super().__init__()
        w = lin.weight.detach()
        pad = -w.shape[0] % 16 if pad_rows else 0
        if pad and lin.bias is not None:
            raise ValueError("Fp8Linear: padded rows need a projection without bias")
        if pad:
            w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
        packed = quantize_weight(w, act)
        self.register_buffer("weight_fp8", packed.q)
        self.register_buffer("weight_scale", packed.scale)
        dev = packed.q.device
        _unit(dev)  # made now, outside any compiled step (there it is read, not made)
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=dev))
        self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32, device=dev))
        self.act = act
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    @property
    def packed(self) -> Fp8Weight:
        return Fp8Weight(
            self.weight_fp8, self.weight_scale, self.act, self.input_scale, self.input_amax
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.packed, self.bias)
        return y if self.weight_fp8.shape[0] == self.out_features else y[..., : self.out_features]

    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


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
            saved += before - q.buffer_bytes()
            del lin
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()
    return saved


def has_weight_only_fp8(model: nn.Module) -> bool:
    """Whether some FP8 projection of ``model`` is weight-only (``act="none"``)."""
    return any(isinstance(m, Fp8Linear) and m.act == "none" for m in model.modules())


def set_activation_mode(model: nn.Module, act: str) -> None:
    """Change how every FP8 projection of ``model`` treats its activations (``ACTIVATIONS``);
    ``static`` only once :func:`calibrate_activations_` has set the scales."""
    if act not in ACTIVATIONS:
        raise ValueError(f"FP8 activation mode {act!r}: one of {ACTIVATIONS}")
    mods = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if act == "static" and any(float(m.input_scale) <= 0 for m in mods):
        raise ValueError("FP8 activation mode 'static': calibrate_activations_ first")
    for m in mods:
        m.act = act


@torch.no_grad()
def quantize_lm_head_(model: nn.Module, act: str = "auto") -> int:
    """Replace ``model.lm_head`` by :class:`Fp8Linear` (the vocabulary's rows scaled one by
    one, as the layers' weights; a vocabulary that does not divide by 16 padded with zero
    rows). Tied to the embeddings, the embeddings keep their dtype and ``lm_head`` gets its
    own FP8 copy. Returns the bytes saved (negative when tied)."""
    lin = model.lm_head
    if isinstance(lin, Fp8Linear):
        return 0
    tied = lin.weight is model.model.embed_tokens.weight  # type: ignore[union-attr]
    before = 0 if tied else lin.weight.numel() * lin.weight.element_size()
    q = Fp8Linear(lin, act, pad_rows=True)
    model.lm_head = q
    return before - q.buffer_bytes()


@torch.no_grad()
def calibrate_activations_(
    model: nn.Module, run: Callable[[], object], margin: float = 2.0
) -> dict[str, float]:
    """Static activation scales: every FP8 projection of ``model`` records the largest
    ``|input|`` while ``run()`` passes calibration inputs through the model (eagerly, with
    dynamic scales), then gets ``input_scale = margin * amax / 448`` and mode ``static``.
    ``margin`` leaves room for larger inputs than calibration saw (beyond it they clip;
    e4m3's 2^-6 smallest normal still leaves 448 * 64 / margin of range below the top).
    Returns each projection's observed amax by module name."""
    if margin < 1:
        raise ValueError(f"calibration margin {margin}: must be >= 1")
    mods = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    if not mods:
        raise ValueError("calibrate_activations_: the model has no FP8 projections")
    saved = {n: m.act for n, m in mods.items()}
    for m in mods.values():
        m.input_amax.zero_()
        m.act = "observe"
    try:
        run()
        seen = {n: float(m.input_amax) for n, m in mods.items()}
        missing = [n for n, a in seen.items() if not a > 0]
        if missing:
            raise ValueError(f"calibration ran no input through {missing[:3]} ({len(missing)})")
    except BaseException:
        for n, m in mods.items():  # as they were
            m.act = saved[n]
        raise
    for m in mods.values():
        m.input_scale.copy_(m.input_amax * margin / FP8_MAX)
        m.act = "static"
    return seen


def weight_of(lin: nn.Module) -> torch.Tensor | Fp8Weight:
    """What the layer functions take for a projection: the tensor or the packed FP8."""
    if isinstance(lin, Fp8Linear):
        return lin.packed
    return lin.weight  # type: ignore[return-value]
