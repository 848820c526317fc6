"""Pre-fill pieces riding in the decode step (``engine.prefill_in_step``) on one GPU
(ENGINE-ONLY): what a step of L lanes costs when R rows of pre-fill pieces (8 positions each,
a listening chunk) ride in it (``DecodeRunner.step_riding``), against the same step after a
batched pass of those pieces (``prefill_batch``, what the scheduler does without riders).
Full-size Step-Audio-R1 decoder shapes, random bf16 weights, the engine's paged KV cache and
runner options (compiled pieces, CUDA graphs), each sequence at position ``--context``.

    python bench/gpu_riders.py                 # from the repository root, on a CUDA machine
    python bench/gpu_riders.py --tiny          # the tests' tiny decoder on the CPU (a smoke run)

Checks first that riding writes what the pass writes: each piece's last logits, and the lanes'
tokens of that step and the next. Times are wall-clock medians of 5 runs after 2 warm-ups,
synchronised after each. Prints a table last and writes ``bench/results/gpu-riders.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_engine import log  # noqa: E402
from bench.gpu_prefill_batch import timed  # noqa: E402
from realtime.engine.step_audio.core import STEP_BATCH_SIZES  # noqa: E402
from realtime.models.decode import (  # noqa: E402
    DecodeRunner,
    LaneSampling,
    Rider,
    RunnerOptions,
)
from realtime.models.kv_pages import PagedKVCache  # noqa: E402
from realtime.models.step_audio.model import random_step_audio  # noqa: E402

LANES = (32, 64)
RIDER_ROWS = (8, 16, 32)
PIECE = 8
MAX_BATCH = 96


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=300, help="positions before each piece")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny decoder on the CPU")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu-riders.json"))
    args = ap.parse_args()
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from step_audio_fixtures import tiny_config

        dev, dtype, cfg = torch.device("cpu"), torch.float32, tiny_config()
        opts = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=STEP_BATCH_SIZES)
    else:
        dev, dtype, cfg = torch.device("cuda"), torch.bfloat16, None
        opts = RunnerOptions(batch_sizes=STEP_BATCH_SIZES)
    opts = RunnerOptions(**{**opts.__dict__, "riders": True})

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    model = random_step_audio(cfg, device=dev, dtype=dtype).decoder
    log(f"decoder built in {time.perf_counter() - t0:.1f} s")
    n_lanes, n_pieces = max(LANES), max(RIDER_ROWS) // PIECE
    sequences = n_lanes + n_pieces
    per_seq = -(-(args.context + 64) // 256)  # pages each sequence needs
    cache = PagedKVCache(
        model.cfg, MAX_BATCH, 2048, dev, dtype, page_size=256, num_pages=sequences * per_seq
    )
    runner = DecodeRunner(model, cache, opts)
    t0 = time.perf_counter()
    captured = runner.capture_all()
    log(f"{captured} graphs captured in {time.perf_counter() - t0:.1f} s ({runner.attention_name})")
    slots = cache.allocate(sequences)
    lane_slots, piece_slots = slots[:n_lanes], slots[n_lanes:]
    hidden = model.cfg.hidden_size
    gen = torch.Generator(device=dev).manual_seed(0)
    context = torch.randn(args.context, hidden, device=dev, dtype=dtype, generator=gen)
    for s in slots:
        runner.prefill(context, s, 0)
    pieces = torch.randn(n_pieces * PIECE, hidden, device=dev, dtype=dtype, generator=gen)
    start = args.context

    def lanes(n: int) -> None:
        runner.clear()
        for s in lane_slots[:n]:
            runner.add_lane(s, start, LaneSampling(), token=11)

    def riders(rows: int) -> list[Rider]:
        k = rows // PIECE
        return [
            Rider(pieces[i * PIECE : (i + 1) * PIECE], s, start)
            for i, s in enumerate(piece_slots[:k])
        ]

    def apart(rows: int) -> tuple[list[int], torch.Tensor]:
        rs = riders(rows)
        logits = runner.prefill_batch(
            torch.cat([r.embeds for r in rs]), [r.slot for r in rs], [start] * len(rs),
            [PIECE] * len(rs), [-1] * len(rs),
        )  # fmt: skip
        return runner.step(), logits

    def riding(rows: int) -> tuple[list[int], torch.Tensor]:
        return runner.step_riding(riders(rows))

    # the same writes and tokens: a pass then a step, against one riding step
    lanes(min(LANES))
    fed_apart, logits_apart = apart(max(RIDER_ROWS))
    next_apart = runner.step()
    lanes(min(LANES))
    fed_riding, logits_riding = riding(max(RIDER_ROWS))
    next_riding = runner.step()
    rel = ((logits_riding - logits_apart).norm() / logits_apart.norm()).item()
    same = bool((logits_riding.argmax(-1) == logits_apart.argmax(-1)).all())
    tokens_equal = fed_apart == fed_riding and next_apart == next_riding
    log(f"riding vs a pass: logits rel diff {rel:.4f}, same argmax {same}, "
        f"lanes' tokens equal {tokens_equal}")  # fmt: skip

    rows_out = []
    for n in LANES:
        lanes(n)
        row: dict[str, float | int] = {"lanes": n, "step_ms": timed(runner.step, sync=sync)}
        for r in RIDER_ROWS:
            if n + r > MAX_BATCH:
                continue
            row[f"pass_and_step_ms_{r}"] = timed(lambda r=r: apart(r), sync=sync)
            row[f"riding_step_ms_{r}"] = timed(lambda r=r: riding(r), sync=sync)
        rows_out.append(row)
        log(str(row))
    result = {
        "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (tiny decoder)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "weights": "random (no checkpoint)",
        "engine_only": True,
        "piece_positions": PIECE,
        "context": args.context,
        "attention": runner.attention_name,
        "check": {"logits_rel_diff": rel, "same_argmax": same, "tokens_equal": tokens_equal},
        "rows": rows_out,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nENGINE-ONLY  {result['card']}  {result['date']}  torch {result['torch']}")
    print(f"{'lanes':>6} | {'step ms':>8} | " + " | ".join(
        f"{r} rows: pass+step / riding" for r in RIDER_ROWS
    ))  # fmt: skip
    for row in rows_out:
        cells = []
        for r in RIDER_ROWS:
            a, b = row.get(f"pass_and_step_ms_{r}"), row.get(f"riding_step_ms_{r}")
            cells.append(f"{a:>10.2f} / {b:>7.2f}" if a is not None else f"{'-':>20}")
        print(f"{row['lanes']:>6} | {row['step_ms']:>8.2f} | " + " | ".join(cells))
    print(
        f"check: logits rel diff {rel:.4f}, same argmax {same}, lanes' tokens equal {tokens_equal}"
    )


if __name__ == "__main__":
    main()
