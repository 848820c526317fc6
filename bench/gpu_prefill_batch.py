"""Batched pre-fill on one GPU (ENGINE-ONLY): B callers' listening chunks (8 positions each,
what 640 ms of speech gives at 12.5 Hz) in one pass (``DecodeRunner.prefill_batch``, as the
scheduler runs them) against one graphed pre-fill per caller (what the engine did before).
Full-size Step-Audio-R1 decoder shapes, random bf16 weights, the engine's paged KV cache and
runner options (compiled pieces, CUDA graphs), each sequence at position ``--context``.

    python bench/gpu_prefill_batch.py          # from the repository root, on a CUDA machine

Checks first that the batched pass writes what the one-by-one pre-fills write (logits of each
piece's last position, and the next decode step of every sequence). Times are wall-clock
medians of 5 runs after 2 warm-ups, synchronised after each. Prints a table last and writes
``bench/results/gpu-prefill-batch.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_engine import log  # noqa: E402
from realtime.engine.step_audio.core import STEP_BATCH_SIZES  # noqa: E402
from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions  # noqa: E402
from realtime.models.kv_pages import PagedKVCache  # noqa: E402
from realtime.models.step_audio.model import random_step_audio  # noqa: E402

CALLERS = (1, 4, 8, 16, 32)
PIECE = 8


def timed(
    fn: Callable[[], object], runs: int = 5, sync: Callable[[], None] = torch.cuda.synchronize
) -> float:
    """Median wall-clock ms of ``runs`` calls after 2 warm-ups, ``sync`` after each."""
    for _ in range(2):
        fn()
    sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=300, help="positions before each piece")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu-prefill-batch.json"))
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    t0 = time.perf_counter()
    model = random_step_audio(device=dev, dtype=dtype).decoder
    log(f"decoder built in {time.perf_counter() - t0:.1f} s")
    n = max(CALLERS)
    per_seq = -(-(args.context + 2 * PIECE) // 256)  # pages each sequence needs
    cache = PagedKVCache(model.cfg, n, 2048, dev, dtype, page_size=256, num_pages=n * per_seq)
    opts = RunnerOptions(batch_sizes=STEP_BATCH_SIZES)
    runner = DecodeRunner(model, cache, opts)
    t0 = time.perf_counter()
    runner.capture_all()
    log(f"graphs captured in {time.perf_counter() - t0:.1f} s ({runner.attention_name})")
    slots = cache.allocate(n)
    hidden = model.cfg.hidden_size
    gen = torch.Generator(device=dev).manual_seed(0)
    context = torch.randn(args.context, hidden, device=dev, dtype=dtype, generator=gen)
    for s in slots:
        runner.prefill(context, s, 0)
    pieces = torch.randn(n * PIECE, hidden, device=dev, dtype=dtype, generator=gen)
    start = args.context

    # the same writes: one by one (graphed, as before) against one batched pass
    check = slots[:4]
    one = torch.stack(
        [runner.prefill(pieces[i * PIECE : (i + 1) * PIECE], s, start) for i, s in enumerate(check)]
    )
    for s in check:
        runner.add_lane(s, start + PIECE, LaneSampling(), token=11)
    runner.step()  # feeds the forced token; the next step feeds what the pre-fill led to
    step_one = runner.step()
    runner.clear()
    many = runner.prefill_batch(
        pieces[: len(check) * PIECE], check, [start] * len(check), [PIECE] * len(check),
        [-1] * len(check),
    )  # fmt: skip
    for s in check:
        runner.add_lane(s, start + PIECE, LaneSampling(), token=11)
    runner.step()
    step_many = runner.step()
    runner.clear()
    rel = ((many - one).norm() / one.norm()).item()
    same = bool((many.argmax(-1) == one.argmax(-1)).all())
    log(f"batched vs one by one: logits rel diff {rel:.4f}, same argmax {same}, "
        f"next step {step_one} vs {step_many}")  # fmt: skip

    rows = []
    for b in CALLERS:
        ss = slots[:b]

        def one_by_one(ss: list[int] = ss) -> None:
            for i, s in enumerate(ss):
                runner.prefill(pieces[i * PIECE : (i + 1) * PIECE], s, start)

        def batched(ss: list[int] = ss) -> None:
            runner.prefill_batch(
                pieces[: len(ss) * PIECE], ss, [start] * len(ss), [PIECE] * len(ss),
                [-1] * len(ss),
            )  # fmt: skip

        row = {"callers": b, "one_by_one_ms": timed(one_by_one), "batched_ms": timed(batched)}
        rows.append(row)
        log(str(row))
    result = {
        "card": torch.cuda.get_device_name(dev),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "weights": "random bf16 (no checkpoint)",
        "engine_only": True,
        "piece_positions": PIECE,
        "context": args.context,
        "attention": runner.attention_name,
        "check": {
            "logits_rel_diff": rel,
            "same_argmax": same,
            "next_step_equal": step_one == step_many,
        },  # fmt: skip
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nENGINE-ONLY  {result['card']}  {result['date']}  torch {result['torch']}")
    print(f"{'callers':>8} | {'one pre-fill each, ms':>22} | {'one batched pass, ms':>21}")
    for r in rows:
        print(f"{r['callers']:>8} | {r['one_by_one_ms']:>22.2f} | {r['batched_ms']:>21.2f}")
    print(
        f"check: logits rel diff {rel:.4f}, same argmax {same}, same next step {step_one == step_many}"
    )


if __name__ == "__main__":
    main()
