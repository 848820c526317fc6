"""Pre-fill attention A/B on one GPU, full-size Step-Audio-R1 decoder with random bf16 weights:
PyTorch's flash kernel (variable-length form, what ``attention="auto"`` picks without the
``flash_attn`` package) against SDPA with a grouped-query bool mask (``attention="sdpa"``).

    python bench/gpu_prefill.py          # from the repository root, on a CUDA machine

Both run in the same process on the same weights and cache, CUDA graphs on, no compile.
Times are wall-clock medians of 10 pre-fills after 2 warm-ups, at position 100 (as
``gpu_engine.py`` does), synchronised after each. Prints a table last and writes
``bench/results/gpu-prefill.json``.
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

from bench.gpu_engine import log, prefill_ms  # noqa: E402
from realtime.models.decode import DecodeRunner, RunnerOptions  # noqa: E402
from realtime.models.qwen2 import KVCache  # noqa: E402
from realtime.models.step_audio.model import random_step_audio  # noqa: E402

SIZES = (8, 64, 165, 512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu-prefill.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    model = random_step_audio(device=dev, dtype=torch.bfloat16).decoder
    torch.cuda.synchronize()
    log(f"decoder built in {time.perf_counter() - t0:.1f} s")
    cache = KVCache(model.cfg, 2, args.max_len, dev, torch.bfloat16)
    slot = cache.allocate(1)[0]
    result: dict = {
        "card": torch.cuda.get_device_name(dev),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "weights": "random bf16 (no checkpoint)",
        "start_position": 100,
    }
    probe = torch.randn(165, model.cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    logits = {}
    for attention in ("auto", "sdpa"):
        opts = RunnerOptions(cuda_graphs=True, compile=False, attention=attention)
        runner = DecodeRunner(model, cache, opts)
        row = {"attention": runner.attention_name}
        for n in SIZES:
            row[f"prefill_{n}_ms"] = prefill_ms(runner, model, slot, n)
        runner.prefill(probe[:100], slot, 0)
        logits[attention] = runner.prefill(probe[100:], slot, 100)
        result[attention] = row
        log(f"{attention}: {row}")
        del runner
        torch.cuda.empty_cache()
    a, b = logits["auto"], logits["sdpa"]
    result["logits_rel_diff"] = ((a - b).norm() / b.norm()).item()
    result["same_argmax"] = bool(a.argmax() == b.argmax())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['card']}  {result['date']}  torch {result['torch']}")
    print(f"{'tokens':>8} | {'torch flash (varlen) ms':>24} | {'sdpa bool mask ms':>18}")
    for n in SIZES:
        fa, sd = result["auto"][f"prefill_{n}_ms"], result["sdpa"][f"prefill_{n}_ms"]
        print(f"{n:>8} | {fa:>24.2f} | {sd:>18.2f}")
    print(
        f"logits relative difference {result['logits_rel_diff']:.4f}, same argmax {result['same_argmax']}"
    )


if __name__ == "__main__":
    main()
