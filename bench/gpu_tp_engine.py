"""The Step-Audio ENGINE tensor-parallel (``engine.tensor_parallel``) on 1, 2 and 4 GPUs.

    python -m bench.gpu_tp_engine          # repository root, a machine with >= 2 GPUs (< 6 min)

For each world size (1, 2, and 4 where there are 4 GPUs; ``--worlds``) a fresh process builds
the engine of ``configs/step-audio-r1-random.yaml`` (full-size Step-Audio-R1 shapes, RANDOM
bf16 weights built on the GPUs, ``forced_answer`` as the spoken text) with
``engine.tensor_parallel`` set to it, ``--context`` positions and ``--max-batch`` sequences
(fewer graphs to capture than the shipped config, for time), warms it up (graph capture on
every rank), then answers typed turns (``think_budget`` 0): one caller twice (the first turn
is a warm-up), then ``--callers`` callers at once (their lanes share each step).

ENGINE-ONLY figures: ms per decode step (first answer token to last / steps), the time from
``respond`` to the first answer token (the typed turn's pre-fill and one step; no ASR, no
TTS), weights per card (rank 0 also holds the audio encoder), peak memory allocated per card
(``torch.cuda.max_memory_allocated`` in each rank's process; the followers report theirs
through the engine's pipe; with ``kv_pages: 0`` the KV pool takes what the weights leave, so the
KV pool per card is printed beside it). Prints a table; writes ``tp-engine-gpu.json`` to ``$OUT`` (if
set) and ``bench/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3
QUESTION = "What is the capital of France, and why is it famous?"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def typed_turns(engine: Any, callers: int, tokens: int) -> dict[str, Any]:
    """``callers`` typed turns answered at once (advanced in turn, as the engine worker
    does); ms per step over the answers' decode, first-token time per caller."""
    from realtime.config import SamplingConfig
    from realtime.engine.base import CancelToken, UserTurn

    times: list[list[float]] = [[] for _ in range(callers)]
    sessions = []
    for k in range(callers):
        s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=tokens))
        s.on_token = lambda role, tok, t, k=k: times[k].append(time.monotonic())
        sessions.append(s)
    steps0 = engine.steps.steps
    t0 = time.monotonic()
    live = [s.respond(UserTurn(text=QUESTION), CancelToken()) for s in sessions]
    while live:
        for it in list(live):
            if next(it, StopIteration) is StopIteration:
                live.remove(it)
    steps = engine.steps.steps - steps0
    for s in sessions:
        s.close()
    flat = [t for ts in times for t in ts]
    first = [ts[0] - t0 for ts in times if ts]
    decode = max(flat) - min(t[0] for t in times if t) if flat else 0.0
    return {
        "callers": callers,
        "steps": steps,
        "tokens": len(flat),
        "ms_per_step": round(1e3 * decode / max(1, steps - 1), 3),
        "first_token_ms": [round(1e3 * f, 1) for f in first],
    }


def child(world: int, args: argparse.Namespace) -> dict[str, Any]:
    """One world size, in this process (rank 0) and the followers it starts."""
    import torch
    import yaml

    from realtime.config import load_config
    from realtime.engine.step_audio import build_step_audio_engine

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = load_config("step-audio-r1-random", overrides).engine
    cfg = dataclasses.replace(
        cfg, tensor_parallel=world, max_context=args.context, max_batch=args.max_batch
    )
    t0 = time.monotonic()
    engine = build_step_audio_engine(cfg)
    built = time.monotonic() - t0
    log(f"world {world}: engine built in {built:.1f} s")
    t0 = time.monotonic()
    engine.warmup()
    warm = time.monotonic() - t0
    log(f"world {world}: warm-up (graphs on every rank) {warm:.1f} s")
    turns = [typed_turns(engine, 1, args.tokens) for _ in range(2)]
    turns.append(typed_turns(engine, args.callers, args.tokens))
    for t in turns:
        log(f"world {world}: {t}")
    dev = engine.device
    model = engine.model
    rank0_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rank0_weights += sum(b.numel() * b.element_size() for b in model.decoder.buffers())
    cuda = dev.type == "cuda"
    cards = [
        {
            "rank": 0,
            "device": str(dev),
            "weights_gib": round(rank0_weights / GIB, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(dev) / GIB, 2)
            if cuda
            else 0.0,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(dev) / GIB, 2)
            if cuda
            else 0.0,
        }
    ]
    if engine.followers is not None:
        for mem, st in zip(engine.followers.memory[1:], engine.followers.stats(), strict=True):
            cards.append(
                {
                    "rank": mem.rank,
                    "device": mem.device,
                    "weights_gib": round(mem.weight_bytes / GIB, 3),
                    "peak_allocated_gib": round(st.get("max_memory_allocated", 0) / GIB, 2),
                    "peak_reserved_gib": round(st.get("max_memory_reserved", 0) / GIB, 2),
                }
            )
    out = {
        "world": world,
        "build_s": round(built, 1),
        "warmup_s": round(warm, 1),
        "kv_pool_gib_per_card": round(
            sum(t.numel() * t.element_size() for t in (*engine.cache.k, *engine.cache.v)) / GIB,
            2,
        ),
        "kv_pages": engine.cache.num_pages,
        "kv_page_size": engine.cache.page_size,
        "sequences": engine.cache.max_batch,
        "attention": engine.runner.attention_name,
        "one_caller": turns[1],
        "callers_at_once": turns[2],
        "cards": cards,
    }
    engine.close()
    return out


def table(res: dict[str, Any]) -> str:
    head = (
        "| GPUs | ms/step, 1 caller | ms/step, {n} callers | first token (1 caller) | "
        "weights per card | KV pool per card | peak allocated per card | build + warm-up |"
    ).format(n=res["callers"])
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w, r in sorted(res["worlds"].items(), key=lambda kv: int(kv[0])):
        if "error" in r:
            lines.append(f"| {w} | failed: {r['error'][-120:]} | | | | | | |")
            continue
        weights = " / ".join(f"{c['weights_gib']:.1f}" for c in r["cards"])
        peak = " / ".join(f"{c['peak_allocated_gib']:.1f}" for c in r["cards"])
        lines.append(
            f"| {w} | {r['one_caller']['ms_per_step']:.2f} | "
            f"{r['callers_at_once']['ms_per_step']:.2f} | "
            f"{r['one_caller']['first_token_ms'][0]:.0f} ms | {weights} GiB | "
            f"{r['kv_pool_gib_per_card']:.1f} GiB | {peak} GiB | "
            f"{r['build_s']:.0f} + {r['warmup_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="", help="comma-separated (default: 1, 2, 4 that fit)")
    ap.add_argument("--context", type=int, default=2048, help="engine.max_context")
    ap.add_argument("--max-batch", type=int, default=4, help="engine.max_batch (sequences)")
    ap.add_argument("--callers", type=int, default=4, help="callers answering at once")
    ap.add_argument("--tokens", type=int, default=64, help="max_new_tokens of each answer")
    ap.add_argument("--timeout", type=float, default=170.0, help="seconds per world size")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override (e.g. engine.device=cpu engine.backend=step-audio "
        "engine.model=DIR: a CPU smoke run on a small checkpoint)",
    )  # fmt: skip
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child, args)
        Path(args.child_out).write_text(json.dumps(res))
        return

    import torch

    gpus = torch.cuda.device_count()
    worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else [1, 2, 4]
    if gpus:
        worlds = [w for w in worlds if w <= gpus]
    res: dict[str, Any] = {
        "card": torch.cuda.get_device_name(0) if gpus else "none",
        "gpus": gpus,
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.gpu_tp_engine " + " ".join(sys.argv[1:]),
        "config": "configs/step-audio-r1-random.yaml (random bf16 weights, forced_answer)",
        "context": args.context,
        "max_batch": args.max_batch,
        "callers": args.callers,
        "engine_only": True,
        "worlds": {},
    }
    for world in worlds:
        out = Path(f"/tmp/tp-engine-{world}.json")
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.gpu_tp_engine", "--child", str(world),
               "--child-out", str(out), "--context", str(args.context),
               "--max-batch", str(args.max_batch), "--callers", str(args.callers),
               "--tokens", str(args.tokens)]  # fmt: skip
        cmd += [a for kv in args.set for a in ("--set", kv)]
        log(f"world {world}: {' '.join(cmd)}")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout, check=False)
            ok = proc.returncode == 0 and out.exists()
            err = "" if ok else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            ok, err = False, f"over {args.timeout:.0f} s"
        res["worlds"][str(world)] = json.loads(out.read_text()) if ok else {"error": err}
        log(f"world {world}: {'done' if ok else err} in {time.monotonic() - t0:.0f} s")
    one = res["worlds"].get("1", {}).get("one_caller", {}).get("ms_per_step")
    for world in worlds[1:]:
        r = res["worlds"][str(world)]
        if one and "one_caller" in r:
            res[f"tp{world}_step_ratio"] = round(r["one_caller"]["ms_per_step"] / one, 3)
    text = json.dumps(res, indent=2) + "\n"
    dest = ROOT / "bench" / "results" / "tp-engine-gpu.json"
    if gpus:  # a CPU smoke run (--set engine.device=cpu) writes no result file
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], dest.name).write_text(text)
    print(f"\n{res['card']} x{gpus}, {res['date']}, engine-only, context {args.context}")
    print(table(res))
    for world in worlds[1:]:
        if f"tp{world}_step_ratio" in res:
            print(f"tp{world} step / one-card step: {res[f'tp{world}_step_ratio']}")


if __name__ == "__main__":
    main()
