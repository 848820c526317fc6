"""The error of FP8 decoder weights (``realtime/models/fp8.py``) on a trained network.

    python -m bench.fp8_error            # CPU, a few seconds after the model loads

The network is SmolLM2-135M-Instruct (the default stack's GGUF, Llama-shaped, served by the
project's Qwen2 decoder with ``attention_bias=False``). Three copies of it: float32 (the
reference), bfloat16, and FP8 weights (e4m3, one scale per output channel, activations
quantised per token; on the CPU the same FP8 values are multiplied in float32), and FP8
weights with float32 activations (weight-only, to tell the two errors apart); with
``--variants``, also the faster variants of ``bench/gpu_serving.py``: ``fp8_static`` (static
activation scales calibrated on ``CALIBRATION``, a text unlike the prompts), ``fp8_head``
(``lm_head`` in FP8 too) and ``fp8_static_head`` (both); or those named after it, e.g.
``--variants fp8_tensor,fp8_static_m1,fp8_static_m8`` (``_tensor``: dynamic scales per tensor
rather than per token; ``_mX``: calibration margin X, default 2). For each of several chat
prompts it compares with the reference:

* the logits of every position of the prompt (one pre-fill): cosine similarity, max abs
  difference over the max abs reference logit, top-1 agreement;
* greedy decoding of ``--steps`` tokens, each copy on its own tokens: how many leading
  tokens equal the reference's, and (teacher-forced on the reference's tokens) top-1
  agreement per step.

Prints a table last and writes ``bench/results/fp8-error.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from realtime.models.fp8 import (
    FP8_MAX,
    Fp8Linear,
    calibrate_activations_,
    quantize_activation,
    quantize_activation_static,
    quantize_decoder_,
    quantize_lm_head_,
)
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (
    "Why is the sky blue? Explain it in two sentences.",
    "What is the capital of France, and what is it famous for?",
    "Give me three tips for sleeping better.",
    "How many legs does a spider have?",
)
# static activation scales are calibrated on this (a chat turn unlike the prompts above)
CALIBRATION = (
    "I'd like to book a table for four people tomorrow evening at seven, somewhere quiet "
    "near the station. Can you also remind me to call my sister about the train tickets?"
)
VARIANTS = ("fp8_static", "fp8_head", "fp8_static_head")
_VARIANT = re.compile(
    r"fp8(?:_(?P<tensor>tensor)|_static(?:_m(?P<margin>[0-9.]+))?)?(?P<head>_head)?"
)


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "input_ids") else ids)


def load_smollm2() -> tuple[Any, Any]:
    """transformers' SmolLM2 model (float32) and tokenizer, as the default engine loads them."""
    from realtime.config import EngineConfig
    from realtime.engine.smollm import _load_converted, bundled_gguf

    return _load_converted(bundled_gguf(), Path(EngineConfig().cache_dir).expanduser())


def ours(hf_model: Any, weights: str, calibration: list[int] | None = None) -> Qwen2ForCausalLM:
    """The project's decoder with the HF weights: ``fp32``, ``bf16``, ``fp8`` (as served:
    activations quantised per token), ``fp8_weight_only`` (activations left in float32), or
    one of ``VARIANTS`` (static scales need ``calibration``: token ids run through the model
    once)."""
    cfg = Qwen2Config.from_text_config({**hf_model.config.to_dict(), "attention_bias": False})
    model = Qwen2ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf_model.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing), (missing, unexpected)
    model = model.to(torch.bfloat16 if weights == "bf16" else torch.float32).eval()
    if weights in ("fp32", "bf16", "fp8_weight_only"):
        if weights == "fp8_weight_only":
            quantize_decoder_(model, act="none")
        return model
    v = _VARIANT.fullmatch(weights)
    if v is None:
        raise ValueError(f"unknown weights kind {weights!r}")
    quantize_decoder_(model, act="tensor" if v["tensor"] else "auto")
    if v["head"]:
        quantize_lm_head_(model)
    if weights.startswith("fp8_static"):
        if calibration is None:
            raise ValueError(f"{weights}: static scales need calibration token ids")
        margin = float(v["margin"] or 2.0)
        calibrate_activations_(model, lambda: run(model, calibration, 2), margin=margin)
    return model


@torch.inference_mode()
def run(model: Qwen2ForCausalLM, ids: list[int], steps: int, force: list[int] | None = None):
    """Logits of the prompt ``[T, V]`` and of each decode step ``[steps, V]`` (float32), and the
    greedy tokens; ``force``: feed these tokens instead of the sampled ones (teacher forcing)."""
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(model.cfg, 1, len(ids) + steps + 1, "cpu", dtype)
    slots = torch.tensor(cache.allocate(1))
    x = torch.tensor(ids)
    prompt = model(model.embed(x)[None], torch.arange(len(ids))[None], cache, slots)[0].float()
    toks, step_logits, pos = [int(prompt[-1].argmax())], [], len(ids)
    for i in range(steps - 1):
        fed = toks[-1] if force is None else force[i]
        lg = model(model.embed(torch.tensor([[fed]])), torch.tensor([[pos]]), cache, slots)
        pos += 1
        step_logits.append(lg[0, -1].float())
        toks.append(int(step_logits[-1].argmax()))
    return prompt, torch.stack(step_logits), toks


def compare(
    hf_model: Any,
    tokenizer: Any,
    steps: int = 16,
    prompts=PROMPTS,
    weight_only: bool = False,
    variants: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Per weights kind (bf16, fp8, and ``variants``): the agreement figures with float32
    (see the header)."""
    kinds = ("bf16", "fp8", "fp8_weight_only") if weight_only else ("bf16", "fp8")
    kinds += tuple(variants)
    calibration = chat_ids(tokenizer, CALIBRATION)
    models = {w: ours(hf_model, w, calibration) for w in ("fp32", *kinds)}
    out: dict[str, Any] = {}
    per: dict[str, list[dict[str, float]]] = {w: [] for w in kinds}
    for text in prompts:
        ids = chat_ids(tokenizer, text)
        ref_prompt, _, ref_toks = run(models["fp32"], ids, steps)
        _, ref_forced, _ = run(models["fp32"], ids, steps, force=ref_toks[1:])
        for w in per:
            prompt, _, toks = run(models[w], ids, steps)
            _, forced, _ = run(models[w], ids, steps, force=ref_toks[1:])
            same = next(
                (i for i, (a, b) in enumerate(zip(toks, ref_toks, strict=True)) if a != b), steps
            )
            both = torch.cat([prompt, forced])
            ref = torch.cat([ref_prompt, ref_forced])
            per[w].append(
                {
                    "cosine_min": float(F.cosine_similarity(both, ref, dim=-1).min()),
                    "cosine_mean": float(F.cosine_similarity(both, ref, dim=-1).mean()),
                    "max_abs_diff_rel": float((both - ref).abs().max() / ref.abs().max()),
                    "top1_agreement": float((both.argmax(-1) == ref.argmax(-1)).float().mean()),
                    "greedy_prefix": same,
                    "greedy_equal": float(toks == ref_toks),
                }
            )
    for w, rows in per.items():
        out[w] = {
            "cosine_min": min(r["cosine_min"] for r in rows),
            "cosine_mean": sum(r["cosine_mean"] for r in rows) / len(rows),
            "max_abs_diff_rel": max(r["max_abs_diff_rel"] for r in rows),
            "top1_agreement": sum(r["top1_agreement"] for r in rows) / len(rows),
            "greedy_prefix_mean": sum(r["greedy_prefix"] for r in rows) / len(rows),
            "greedy_equal_prompts": int(sum(r["greedy_equal"] for r in rows)),
            "prompts": len(rows),
            "steps": steps,
        }
    out["weight_bytes"] = {w: m.weight_bytes() for w, m in models.items()}
    return out


@torch.inference_mode()
def activation_error(model: Qwen2ForCausalLM, ids: list[int]) -> dict[str, dict[str, float]]:
    """How well each projection's input is quantised on one prompt (pre-fill), per kind of
    projection (q/k/v, o, gate/up, down): mean relative error of the quantised rows with a
    dynamic per-token scale and with the model's static scale, and the fraction of inputs
    the static scale clips. ``model``: FP8 with calibrated static scales."""
    from realtime.models import fp8

    names = {id(m.weight_fp8): n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    inputs: dict[str, torch.Tensor] = {}
    plain = fp8.fp8_linear

    def spy(x: torch.Tensor, w: fp8.Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        name = names.get(id(w.q))
        if name is not None and name not in inputs:
            inputs[name] = x.detach().reshape(-1, x.shape[-1]).float().clone()
        return plain(x, w, bias)

    fp8.fp8_linear = spy  # the Fp8Linear modules look it up at each call
    try:
        run(model, ids, 2)
    finally:
        fp8.fp8_linear = plain
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for name, x in inputs.items():
        s = model.get_submodule(name).input_scale
        xq, sx = quantize_activation(x, True)
        token = ((xq.float() * sx - x).norm(dim=1) / x.norm(dim=1)).mean()
        xs = quantize_activation_static(x, s).float() * s
        static = ((xs - x).norm(dim=1) / x.norm(dim=1)).mean()
        clipped = (x.abs() > s * FP8_MAX).float().mean()
        rows.setdefault(name.split(".")[-1], []).append(
            (float(token), float(static), float(clipped))
        )
    return {
        kind: dict(zip(("token_rel_error", "static_rel_error", "static_clipped_fraction"),
                       (round(float(v), 5) for v in torch.tensor(r).mean(0)), strict=True))
        for kind, r in rows.items()
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fp8-error.json"))
    ap.add_argument("--variants", nargs="?", const=",".join(VARIANTS), default="",
                    help=f"also these (alone: {', '.join(VARIANTS)})")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(2)
    hf_model, tokenizer = load_smollm2()
    variants = tuple(v for v in args.variants.split(",") if v)
    res = compare(hf_model, tokenizer, args.steps, weight_only=True, variants=variants)
    if "fp8_static" in variants:
        static = ours(hf_model, "fp8_static", chat_ids(tokenizer, CALIBRATION))
        res["activation_error_first_prompt"] = activation_error(
            static, chat_ids(tokenizer, PROMPTS[0])
        )
    res["network"] = "SmolLM2-135M-Instruct (trained), reference float32"
    res["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    res["command"] = "python -m bench.fp8_error " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    keys = ("cosine_min", "cosine_mean", "max_abs_diff_rel", "top1_agreement",
            "greedy_prefix_mean", "greedy_equal_prompts")  # fmt: skip
    print("\n| vs float32 | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for w in ("bf16", "fp8", "fp8_weight_only", *variants):
        cells = [f"{res[w][k]:.4g}" for k in keys]
        print(f"| {w} weights | " + " | ".join(cells) + " |")
    print(f"(greedy over {args.steps} steps, {len(PROMPTS)} prompts)")
    for kind, row in res.get("activation_error_first_prompt", {}).items():
        print(f"activations of {kind} (first prompt): {row}")


if __name__ == "__main__":
    main()
