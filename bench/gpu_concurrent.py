"""Two callers answered at once on one GPU: full-size Step-Audio-R1 shapes, random bf16 weights.
Their lanes share each batched decode step (``realtime.engine.scheduler``); this measures the
step time with one caller and with two, in the same process.

    python bench/gpu_concurrent.py       # from the repository root, on a CUDA machine

Each caller listens to 3 s of synthetic speech, then answers with ``think_budget`` 0 and
``--tokens`` tokens at most (random weights may end earlier); the answers are advanced one
item at a time in turn, as the engine worker does. ms/step = decode wall time (first token to
last) / steps. Prints a table last and writes ``bench/results/gpu-concurrent.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_engine import log, synthetic_speech  # noqa: E402
from realtime.config import SamplingConfig, load_config  # noqa: E402
from realtime.engine.base import CancelToken, UserTurn  # noqa: E402
from realtime.engine.step_audio import build_step_audio_engine  # noqa: E402


def answer_at_once(engine, callers: int, tokens: int) -> dict:
    sessions, times = [], []
    for k in range(callers):
        s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=tokens))
        s.on_token = lambda role, tok, t: times.append(t)
        audio = synthetic_speech(3.0, 10 + k)
        s.listen(audio)
        engine.between_jobs()  # its pieces' pre-fill pass, as the engine worker runs it
        sessions.append((s, audio))
    torch.cuda.synchronize()
    steps0 = engine.steps.steps
    live = [s.respond(UserTurn(), CancelToken()) for s, _ in sessions]
    t0 = time.monotonic()
    while live:
        for it in list(live):
            if next(it, StopIteration) is StopIteration:
                live.remove(it)
    wall = time.monotonic() - t0
    steps = engine.steps.steps - steps0
    for s, _ in sessions:
        s.close()
    decode = max(times) - min(times) if times else 0.0
    return {
        "callers": callers,
        "steps": steps,
        "tokens": len(times),
        "ms_per_step": 1e3 * decode / max(1, steps - 1),
        "tokens_per_s": len(times) / decode if decode else 0.0,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--context", type=int, default=4096, help="engine.max_context")
    ap.add_argument("--max-batch", type=int, default=-1, help="engine.max_batch (default: config)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu-concurrent.json"))
    args = ap.parse_args()
    cfg = load_config("step-audio-r1-random")
    t0 = time.monotonic()
    ecfg = dataclasses.replace(cfg.engine, max_context=args.context)
    if args.max_batch >= 0:
        ecfg = dataclasses.replace(ecfg, max_batch=args.max_batch)
    engine = build_step_audio_engine(ecfg)
    engine.warmup()
    log(f"engine built and warmed up in {time.monotonic() - t0:.1f} s")
    rows = []
    for callers in (1, 2, 1, 2):  # each twice, interleaved: the second pass is the one kept
        rows.append(answer_at_once(engine, callers, args.tokens))
        log(str(rows[-1]))
    kept = rows[2:]
    result = {
        "card": torch.cuda.get_device_name(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "attention": engine.runner.attention_name,
        "weights": "random bf16 (no checkpoint)",
        "runs": rows,
        "one_caller": kept[0],
        "two_callers": kept[1],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['card']}  {result['date']}  torch {result['torch']}")
    print(
        f"{'callers':>7} | {'steps':>5} | {'tokens':>6} | {'ms/step':>7} | {'tokens/s (all callers)':>22}"
    )
    for r in kept:
        print(
            f"{r['callers']:>7} | {r['steps']:>5} | {r['tokens']:>6} | {r['ms_per_step']:>7.2f} | "
            f"{r['tokens_per_s']:>22.1f}"
        )


if __name__ == "__main__":
    main()
