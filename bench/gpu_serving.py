"""GPU figures of issue 11: FP8 weights, sessions that fit, tensor parallelism.

    python -m bench.gpu_serving --part fp8            # one GPU: bf16 vs FP8 step, sessions at 4k
    python -m bench.gpu_serving --part tp --world 2   # world 1 and world 2 step in one call
    python -m bench.gpu_serving --part report         # merge the JSON parts, print the table

Full-size Step-Audio-R1 decoder shapes (Qwen2.5-32B: 64 layers, 5120 wide) with RANDOM
weights (the tokens mean nothing; speed and memory only). Every step is the project's own
``DecodeRunner`` step (CUDA graph per batch size, compiled layer, Triton decode attention,
GPU sampling), lanes at context 100, timed over ``--steps`` steps after warm-up.

* ``fp8``: the bf16 step at batch 1/8/32; then the same model with its layer weights
  quantised in place to FP8 (``realtime/models/fp8.py``: e4m3, per-output-channel weight
  scales, ``torch._scaled_mm``), same batches, once per variant of ``--variants``
  (``FP8_VARIANTS``: dynamic activation scales per tensor at one row and per token above
  (``auto``, the default), the same with inductor's split reductions, static scales
  calibrated on a random pre-fill, and each with ``lm_head`` in FP8 too). Then ``max_sessions_4k_context``: how many 4096-position
  KV slots fit in the memory left after the FP8 weights (``realtime.engine.step_audio.core``'s
  sizing), verified by allocating that cache and stepping that many lanes at context 4000.
* ``tp``: processes spawned one per GPU (NCCL), the decoder split as in
  ``realtime/models/tensor_parallel.py`` (``lm_head`` split by vocabulary, its logits
  all-gathered; ``--replicated-head``: whole on every card); world 1 (one whole card) and
  world ``--world`` run in the same call; step time at batch 1/8/32 and memory per card.
  Each row records ``lm_head`` (``vocab-split`` or ``replicated``) and ``all_reduce``
  (``nccl``, ``symm-mem one-shot``, or ``symm-mem one-shot copy``: the kernel copies its
  input; ``--symm-copy-first`` forces the older copy then one-shot).
Writes ``$OUT``/``bench/results/serving-gpu-<part>.json``; ``report`` merges them into
``bench/results/serving-gpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions  # noqa: E402
from realtime.models.fp8 import (  # noqa: E402
    Fp8Linear,
    calibrate_activations_,
    quantize_decoder_,
    set_activation_mode,
)
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from realtime.models.step_audio.config import step_audio_r1_config  # noqa: E402

GIB = 1024**3
CONTEXT = 100
BATCHES = (1, 8, 32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_decoder(cfg: Qwen2Config, dev: torch.device, seed: int = 0) -> Qwen2ForCausalLM:
    """A decoder of ``cfg`` with random bf16 weights, built on ``dev`` (N(0, 0.02), norms 1)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device=dev)
    model.after_to_empty()
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def step_ms(runner: DecodeRunner, slots: list[int], bs: int, context: int, steps: int) -> float:
    """ms per step with ``bs`` lanes at ``context`` (median of 3 runs of ``steps`` steps)."""
    runner.clear()
    for s in slots[:bs]:
        runner.add_lane(s, context, LaneSampling(), token=100 + s)
    runs = []
    for _ in range(3):
        for _ in range(3):
            runner.step()
        runner.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        runner.sync()
        runs.append(1e3 * (time.perf_counter() - t0) / steps)
        runner.clear()
        for s in slots[:bs]:
            runner.add_lane(s, context, LaneSampling(), token=100 + s)
    runner.clear()
    return sorted(runs)[1]


def batch_table(
    model, cache, slots, steps, opts: RunnerOptions, batches: tuple[int, ...] = BATCHES
) -> dict[str, float]:
    torch._dynamo.reset()
    runner = DecodeRunner(model, cache, opts)
    row = {f"b{bs}": round(step_ms(runner, slots, bs, CONTEXT, steps), 3) for bs in batches}
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return row


def fp8_kernel_check(dev: torch.device) -> dict[str, float]:
    """The CUDA product (``_scaled_mm``) against the CPU emulation of the same FP8 values and
    against the unquantised product: relative errors, per variant, on fresh random data."""
    from realtime.models.fp8 import fp8_linear, quantize_weight

    out: dict[str, float] = {}
    w = torch.randn(1024, 5120) * 0.02
    x = torch.randn(8, 5120)
    ref = x @ w.t()
    for act in ("token", "tensor", "none"):
        q = quantize_weight(w, act)
        emu = fp8_linear(x, q)
        qd = type(q)(q.q.to(dev), q.scale.to(dev), act)
        y = fp8_linear(x.to(dev, torch.bfloat16), qd).float().cpu()
        out[f"{act}_vs_emulation"] = float((y - emu).norm() / emu.norm())
        out[f"{act}_vs_unquantised"] = float((y - ref).norm() / ref.norm())
    return out


def part_fp8(args: argparse.Namespace) -> dict[str, Any]:
    from realtime.engine.step_audio.core import sessions_that_fit

    variants = parse_variants(args.variants)
    batches = tuple(int(b) for b in args.batches.split(","))
    if 1 not in batches or not set(batches) <= set(BATCHES):
        raise SystemExit(f"--batches {args.batches}: 1 and any of {BATCHES}")
    dev = torch.device("cuda", 0)
    res: dict[str, Any] = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    res["fp8_kernel_check"] = fp8_kernel_check(dev)
    log(f"fp8 kernel check: {res['fp8_kernel_check']}")
    cfg = step_audio_r1_config().text
    t0 = time.perf_counter()
    model = random_decoder(cfg, dev)
    torch.cuda.synchronize()
    res["bf16_weight_gib"] = round(model.weight_bytes() / GIB, 2)
    log(
        f"{res['card']}: random decoder {res['bf16_weight_gib']} GiB in {time.perf_counter() - t0:.1f}s"
    )
    opts = RunnerOptions(cuda_graphs=True, compile=True, batch_sizes=BATCHES, len_buckets=(512,))
    cache = KVCache(cfg, max(BATCHES), 512, dev, torch.bfloat16)
    slots = cache.allocate(max(BATCHES))
    res["bf16_ms_per_step"] = batch_table(model, cache, slots, args.steps, opts, batches)
    log(f"bf16: {res['bf16_ms_per_step']}")
    write(f"serving-gpu-fp8{args.suffix}.json", {**res, "partial": True})
    free, total = torch.cuda.mem_get_info(dev)
    res["bf16_max_sessions_4k_context"] = sessions_that_fit(
        cfg, torch.bfloat16, free + cache_bytes(cache), total, 4096
    )

    t0 = time.perf_counter()
    saved = quantize_decoder_(model)
    torch.cuda.synchronize()
    res["quantize_s"] = round(time.perf_counter() - t0, 2)
    res["fp8_weight_gib"] = round(model.weight_bytes() / GIB, 2)
    log(f"fp8: {saved / GIB:.1f} GiB saved in {res['quantize_s']} s -> {res['fp8_weight_gib']} GiB")

    def save(rows: dict[str, Any]) -> None:
        write(f"serving-gpu-fp8{args.suffix}.json", {**res, **rows, "partial": True})

    res.update(fp8_variant_tables(model, cache, slots, args.steps, opts, variants, save, batches))
    res["bf16_ms_per_token_b1"] = res["bf16_ms_per_step"]["b1"]
    if args.skip_sessions:
        return res

    # sessions at 4k context: the engine's sizing, then proven by allocating and stepping them
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    n = sessions_that_fit(cfg, torch.bfloat16, free, total, 4096)
    res["max_sessions_4k_context"] = n
    res["free_gib_after_fp8_weights"] = round(free / GIB, 2)
    log(f"{n} sessions of 4096 positions fit in {free / GIB:.1f} GiB free")
    try:
        big = KVCache(cfg, n, 4096, dev, torch.bfloat16)
        lanes = big.allocate(n)
        torch._dynamo.reset()
        runner = DecodeRunner(
            model,
            big,
            RunnerOptions(cuda_graphs=True, compile=True, batch_sizes=(n,), len_buckets=(4096,)),
        )
        res["step_ms_all_sessions_at_4000"] = round(step_ms(runner, lanes, n, 4000, args.steps), 3)
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 2)
        log(f"{n} lanes at context 4000: {res['step_ms_all_sessions_at_4000']} ms per step")
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res["max_sessions_check_error"] = repr(exc)[:500]
    return res


class Fp8Variant(NamedTuple):
    act: str  # every FP8 projection's activation mode (fp8.ACTIVATIONS)
    head: str  # lm_head weights: bf16 or fp8
    opts: dict[str, Any] = {}  # RunnerOptions changes
    small: str = ""  # another mode for the two small products (q/k/v, o), if set


# FP8 variants of the step
FP8_VARIANTS: dict[str, Fp8Variant] = {
    "fp8_auto": Fp8Variant("auto", "bf16"),  # the default: dynamic, per tensor at one row
    "fp8_token": Fp8Variant("token", "bf16"),  # dynamic row-wise scales at every batch size
    "fp8_auto_split": Fp8Variant("auto", "bf16", {"split_reductions": True}),  # split amax
    "fp8_static": Fp8Variant("static", "bf16"),  # calibrated static scales: no amax per step
    "fp8_auto_head": Fp8Variant("auto", "fp8"),  # + FP8 lm_head
    "fp8_static_head": Fp8Variant("static", "fp8"),
    # q/k/v and o (5120 / 7168 outputs: 40 / 56 of cuBLAS's 128-wide tiles on 132 SMs) as
    # weight-only GEMVs that inductor tunes; gate/up and down as above
    "fp8_static_head_small_gemv": Fp8Variant("static", "fp8", small="none"),
    # inductor times cuBLAS against its Triton FP8 GEMM templates for each product
    "fp8_static_head_autotune": Fp8Variant("static", "fp8", {"autotune_gemm": True}),
}
# the baseline and the likeliest best first (a run cut short at its time limit keeps them)
DEFAULT_VARIANTS = ",".join(
    ("fp8_auto", "fp8_static_head", "fp8_static", "fp8_auto_head", "fp8_auto_split",
     "fp8_static_head_small_gemv", "fp8_static_head_autotune")
)  # fmt: skip


def set_variant(model: Qwen2ForCausalLM, v: Fp8Variant, heads: dict[str, nn.Module]) -> None:
    model.lm_head = heads[v.head]
    set_activation_mode(model, v.act)
    if v.small:
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.act = layer.self_attn.o_proj.act = v.small


def parse_variants(text: str) -> list[str]:
    variants = [v for v in text.split(",") if v]
    unknown = [v for v in variants if v not in FP8_VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"FP8 variants {unknown or text!r}: of {', '.join(FP8_VARIANTS)}")
    return variants


def fp8_variant_tables(
    model: Qwen2ForCausalLM,
    cache: KVCache,
    slots: list[int],
    steps: int,
    opts: RunnerOptions,
    variants: list[str],
    on_row: Callable[[dict[str, Any]], None] = lambda res: None,
    batches: tuple[int, ...] = BATCHES,
) -> dict[str, Any]:
    """The step at each batch size for each FP8 variant of a model whose decoder is FP8
    already; static scales calibrated first. Leaves the model as the fastest variant at
    batch 1 (its ``lm_head``; the other one freed) and returns the figures; ``on_row`` sees
    them after each variant (the caller saves them: a run cut short keeps what it measured)."""
    res: dict[str, Any] = {}
    heads: dict[str, nn.Module] = {"bf16": model.lm_head, "fp8": Fp8Linear(model.lm_head)}
    # static activation scales, calibrated once (decoder and FP8 lm_head) on a random pre-fill
    model.lm_head = heads["fp8"]
    t0 = time.perf_counter()
    calibrate_random(model)
    res["calibrate_s"] = round(time.perf_counter() - t0, 2)
    for name in variants:
        v = FP8_VARIANTS[name]
        set_variant(model, v, heads)
        try:
            vopts = dataclasses.replace(opts, **v.opts)
            res[f"{name}_ms_per_step"] = batch_table(model, cache, slots, steps, vopts, batches)
        except Exception as exc:  # noqa: BLE001 - report the variant as failed, go on
            traceback.print_exc()
            res[f"{name}_error"] = repr(exc)[:500]
        log(f"{name}: {res.get(f'{name}_ms_per_step') or res.get(f'{name}_error')}")
        on_row(res)
    res["fp8_variants"] = {n: FP8_VARIANTS[n]._asdict() for n in variants}
    done = [n for n in variants if f"{n}_ms_per_step" in res]
    if not done:
        raise RuntimeError("no FP8 variant ran")
    best = min(done, key=lambda n: res[f"{n}_ms_per_step"]["b1"])
    res["fp8_variant"] = best
    res["fp8_ms_per_token_b1"] = res[f"{best}_ms_per_step"]["b1"]
    set_variant(model, FP8_VARIANTS[best], heads)
    heads.clear()  # the other head is freed with it
    return res


def calibrate_random(model: Qwen2ForCausalLM) -> None:
    """Static activation scales from one eager pre-fill of 64 random tokens (random weights:
    the scales matter for speed only here; on a trained model calibrate on real text)."""
    cfg, emb = model.cfg, model.model.embed_tokens.weight
    dev = emb.device
    cal = KVCache(cfg, 1, 128, dev, emb.dtype)
    slots = torch.tensor(cal.allocate(1), device=dev)
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device=dev)
    pos = torch.arange(64, device=dev)[None]
    calibrate_activations_(model, lambda: model(model.embed(ids), pos, cal, slots))


def graph_ms(fn: Callable[[], None], reps: int = 20) -> float:
    """ms per replay of ``fn`` captured in one CUDA graph (warmed up on a side stream)."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return round(1e3 * (time.perf_counter() - t0) / reps, 3)


def part_profile(args: argparse.Namespace) -> dict[str, Any]:
    """Where the FP8 step's time goes: the matrix products alone in one graph (with and
    without the activation quantisation), and the top kernels of the compiled step."""
    from torch.profiler import ProfilerActivity, profile

    from realtime.models.fp8 import FAST_ACCUM, quantize_activation

    dev = torch.device("cuda", 0)
    res: dict[str, Any] = {"card": torch.cuda.get_device_name(dev)}
    cfg = step_audio_r1_config().text
    model = random_decoder(cfg, dev)
    quantize_decoder_(model)
    variant = FP8_VARIANTS[parse_variants(args.variant)[0]]
    heads: dict[str, nn.Module] = {"bf16": model.lm_head}
    if variant.head == "fp8":
        heads["fp8"] = Fp8Linear(model.lm_head)
        model.lm_head = heads["fp8"]
    if "static" in (variant.act, variant.small):
        calibrate_random(model)
    set_variant(model, variant, heads)
    heads.clear()
    res.update(variant=args.variant, **variant._asdict())
    lws = model.layer_weights()
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kinds = ("qkv", "o", "gu", "down")
    for bs in (1, 8, 32):
        x = torch.randn(bs, h, device=dev, dtype=torch.bfloat16)
        xi = torch.randn(bs, inter, device=dev, dtype=torch.bfloat16)
        xq, sx = quantize_activation(x, True)
        xiq, sxi = quantize_activation(xi, True)
        one = torch.ones((), device=dev)

        def mm_only(rowwise: bool, only=kinds, xq=xq, sx=sx, xiq=xiq, sxi=sxi, one=one) -> None:
            for lw in lws:
                for kind, w, a, sa in (("qkv", lw.qkv_w, xq, sx), ("o", lw.o_w, xq, sx),
                                       ("gu", lw.gu_w, xq, sx), ("down", lw.down_w, xiq, sxi)):  # fmt: skip
                    if kind not in only:
                        continue
                    if rowwise:
                        torch._scaled_mm(a, w.q.t(), scale_a=sa, scale_b=w.scale[None, :],
                                         out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)  # fmt: skip
                    else:
                        torch._scaled_mm(a, w.q.t(), scale_a=one, scale_b=one,
                                         out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM)  # fmt: skip

        for name, fn in (("mm_rowwise", lambda: mm_only(True)), ("mm_tensor", lambda: mm_only(False))):  # fmt: skip
            res[f"{name}_b{bs}_ms"] = graph_ms(fn)
        if bs == 1:  # each product kind alone (64 layers): its share, and the bytes per second
            for kind in kinds:
                w = getattr(lws[0], f"{kind}_w")
                gbytes = len(lws) * w.q.numel() / 1e9
                for name, rw in (("rowwise", True), ("tensor", False)):
                    ms = graph_ms(lambda rw=rw, kind=kind: mm_only(rw, (kind,)))
                    res[f"mm_{name}_{kind}_b1_ms"] = ms
                    res[f"mm_{name}_{kind}_b1_tb_per_s"] = round(gbytes / ms, 3)
        log({k: v for k, v in res.items() if f"b{bs}_" in k})
    cache = KVCache(cfg, 1, 512, dev, torch.bfloat16)
    runner = DecodeRunner(model, cache, RunnerOptions(batch_sizes=(1,), len_buckets=(512,)))
    slot = cache.allocate(1)[0]
    runner.add_lane(slot, CONTEXT, LaneSampling(), token=7)
    for _ in range(3):
        runner._forward_step(1, 512, True)
    runner.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner._forward_step(1, 512, True)
        runner.sync()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            rows.append((ev.key[:90], round(t / 1e3 / 3, 3), ev.count // 3))
    rows.sort(key=lambda r: -r[1])
    res["kernels_b1"] = rows[:25]
    for r in rows[:25]:
        log(f"  {r[1]:8.3f} ms x{r[2]:4d}  {r[0]}")
    return res


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v))


# ---- tensor parallel -------------------------------------------------------------------------
def _tp_worker(
    rank: int,
    world: int,
    port: int,
    steps: int,
    out_path: str,
    symm: bool,
    split_head: bool = True,
    copy_kernel: bool = True,
) -> None:
    import torch.distributed as dist

    from realtime.models.tensor_parallel import (
        all_reduce_kind,
        local_config,
        set_group,
        use_symmetric_memory,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    if world > 1:
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
        set_group(dist.group.WORLD)
    symm = symm and use_symmetric_memory(max(BATCHES) * 5120, torch.bfloat16, dev, copy_kernel)
    cfg = step_audio_r1_config().text
    local = local_config(cfg, world, split_vocab=split_head) if world > 1 else cfg
    model = random_decoder(local, dev, seed=rank)
    cache = KVCache(local, max(BATCHES), 512, dev, torch.bfloat16)
    slots = cache.allocate(max(BATCHES))
    row: dict[str, Any] = {
        "world": world,
        # tensor_parallel.all_reduce_kind(): nccl, symm-mem one-shot (copy_ first), or
        # symm-mem one-shot copy (one_shot_all_reduce_copy: the kernel copies its input)
        "all_reduce": all_reduce_kind() if world > 1 else "none",
        # lm_head's rows split over the ranks (logits all-gathered) or whole on each
        "lm_head": "vocab-split" if local.vocab_shards > 1 else "replicated",
        "lm_head_rows_per_card": local.head_rows,
        "weight_gib_per_card": round(model.weight_bytes() / GIB, 2),
    }
    for compiled in (True, False):
        opts = RunnerOptions(
            cuda_graphs=True, compile=compiled, batch_sizes=BATCHES, len_buckets=(512,)
        )
        try:
            row["ms_per_step"] = batch_table(model, cache, slots, steps, opts)
            row["compiled"] = compiled
            break
        except Exception as exc:  # noqa: BLE001 - fall back to the uncompiled graphed step
            traceback.print_exc()
            row[f"error_compiled_{compiled}"] = repr(exc)[:500]
    row["max_memory_gib_per_card"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 2)
    if rank == 0:
        Path(out_path).write_text(json.dumps(row))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def part_tp(args: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as mp

    res: dict[str, Any] = {"card": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    worlds = [1] + [w for w in (2, 4) if w <= args.world and w <= torch.cuda.device_count()]
    runs = [(w, False) for w in worlds if w == 1 or not args.skip_nccl]
    runs += [(w, True) for w in worlds[1:] if args.symm]
    for world, symm in runs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        name = f"tp{world}" + ("_symm" if symm else "")
        path = f"/tmp/{name}.json"
        t0 = time.perf_counter()
        try:
            mp.spawn(
                _tp_worker,
                args=(
                    world, port, args.steps, path, symm,
                    not args.replicated_head, not args.symm_copy_first,
                ),
                nprocs=world,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failed variant is reported, not fatal
            res[f"{name}_error"] = repr(exc)[-800:]
            log(f"{name} failed: {exc}")
            continue
        res[name] = json.loads(Path(path).read_text())
        log(f"{name} ({time.perf_counter() - t0:.0f} s): {res[name]}")
    one = res["tp1"]["ms_per_step"]
    for world in worlds[1:]:
        rows = [
            res[n] for n in (f"tp{world}", f"tp{world}_symm") if res.get(n, {}).get("ms_per_step")
        ]
        if rows:
            best = min(rows, key=lambda r: r["ms_per_step"]["b1"])
            ms = best["ms_per_step"]
            res[f"tp{world}_all_reduce"] = best.get("all_reduce", "nccl")
            res[f"tp{world}_lm_head"] = best.get("lm_head", "replicated")
            res[f"tp{world}_step_ratio_per_batch"] = {b: round(ms[b] / one[b], 3) for b in one}
            res[f"tp{world}_step_ratio"] = res[f"tp{world}_step_ratio_per_batch"]["b1"]
    return res


def write(name: str, res: dict[str, Any]) -> Path:
    res["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    res["command"] = "python -m bench.gpu_serving " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res["weights"] = "random (full-size Step-Audio-R1 decoder shapes), no checkpoint"
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2) + "\n"
    out.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(text)
    return out


def report() -> None:
    """Merge the parts into ``serving-gpu.json`` and print the table."""
    d = ROOT / "bench" / "results"
    fp8 = json.loads((d / "serving-gpu-fp8.json").read_text())
    tp_file = d / "serving-gpu-tp.json"
    tp = json.loads(tp_file.read_text()) if tp_file.exists() else {}
    symm_file = d / "serving-gpu-tp-symm.json"  # a run with --symm --skip-nccl, if any
    symm = json.loads(symm_file.read_text()) if symm_file.exists() else {}
    res = {
        "card": fp8["card"],
        "fp8_ms_per_token_b1": fp8["fp8_ms_per_token_b1"],
        "bf16_ms_per_token_b1": fp8["bf16_ms_per_token_b1"],
        # start-up sizing; the measured largest N (bench/load.py) is recorded beside it
        "max_sessions_4k_context_sizing": fp8.get("max_sessions_4k_context"),
        "tp2_step_ratio": min(
            (r for r in (tp.get("tp2_step_ratio"), symm.get("tp2_step_ratio")) if r), default=None
        ),
        "tp2_step_ratio_nccl": tp.get("tp2_step_ratio"),
        "tp2_step_ratio_symmetric_memory": symm.get("tp2_step_ratio"),
        "tp4_step_ratio": tp.get("tp4_step_ratio"),
        "tp_run": {k: tp.get(k) for k in ("card", "gpus", "date", "command")},
        "per_batch_ms": {
            k[: -len("_ms_per_step")]: v for k, v in fp8.items() if k.endswith("_ms_per_step")
        },
        "fp8": fp8,
        "tp": tp,
        "tp_symmetric_memory": symm,
    }
    fe = d / "fp8-error.json"
    if fe.exists():
        res["fp8_error"] = json.loads(fe.read_text())
    # the load figures (``load``, ``max_sessions_4k_context``, ...) come from bench/load.py runs
    # recorded with their notes (docs/benchmarks.md): kept as they are
    out = d / "serving-gpu.json"
    res = {**(json.loads(out.read_text()) if out.exists() else {}), **res}
    (d / "serving-gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    print("| ms per step (context 100) | " + " | ".join(f"b{b}" for b in BATCHES) + " |")
    print("| --- |" + " --- |" * len(BATCHES))
    for name, row in res["per_batch_ms"].items():
        print(f"| {name} | " + " | ".join(str(row[f"b{b}"]) for b in BATCHES) + " |")
    for w, run in (
        (1, tp.get("tp1")),
        (2, tp.get("tp2")),
        (4, tp.get("tp4")),
        (2, symm.get("tp2_symm")),
    ):
        row = (run or {}).get("ms_per_step")
        if row:
            print(
                f"| bf16 tensor parallel x{w} ({run.get('all_reduce', 'nccl')}, "
                f"lm_head {run.get('lm_head', 'replicated')}) | "
                + " | ".join(str(row[f"b{b}"]) for b in BATCHES)
                + " |"
            )
    for k in ("card", "fp8_ms_per_token_b1", "bf16_ms_per_token_b1", "max_sessions_4k_context",
              "tp2_step_ratio", "tp4_step_ratio"):  # fmt: skip
        print(f"{k}: {res.get(k)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("fp8", "profile", "tp", "report"), required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--symm", action="store_true", help="tp: also the symmetric-memory all-reduce")
    ap.add_argument("--skip-nccl", action="store_true", help="tp: world > 1 only with --symm")
    ap.add_argument(
        "--replicated-head",
        action="store_true",
        help="tp: lm_head whole on every card (as before the vocab split)",
    )
    ap.add_argument("--symm-copy-first", action="store_true",
                    help="tp: symmetric memory with copy_ then one_shot_all_reduce, not the "
                    "one_shot_all_reduce_copy kernel")  # fmt: skip
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"fp8: comma-separated, of {', '.join(FP8_VARIANTS)}")  # fmt: skip
    ap.add_argument("--batches", default="1,8,32", help="fp8: batch sizes (of 1, 8, 32)")
    ap.add_argument("--suffix", default="", help="output serving-gpu-<part><suffix>.json")
    ap.add_argument("--skip-sessions", action="store_true", help="fp8: no 4k-context sizing")
    ap.add_argument("--variant", default="fp8_auto", help="profile: one of the FP8 variants")
    args = ap.parse_args()
    if args.part == "report":
        report()
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    parts = {"fp8": part_fp8, "profile": part_profile, "tp": part_tp}
    res = parts[args.part](args)
    write(f"serving-gpu-{args.part}{args.suffix}.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
