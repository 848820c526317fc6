"""GPU figures of the paged KV pool (issue 11 point 1): step time against the fixed-slot cache,
and how many sessions the pool holds at a 4k context.

    python -m bench.gpu_kv_pages [--steps 20]

Full-size Step-Audio-R1 decoder shapes (Qwen2.5-32B: 64 layers, 5120 wide) with RANDOM bf16
weights (speed and memory only). In one process: the project's ``DecodeRunner`` step (CUDA
graph per batch size, compiled layer) at batch 1/8/32, lanes at context ``CONTEXT``, over

* the fixed-slot ``KVCache`` (32 slots of 1024 positions), and
* the ``PagedKVCache`` (``realtime/models/kv_pages.py``) with the same memory in pages of
  256 positions (each lane's pages taken as a session's would be), the step's attention the
  paged Triton op ``realtime::decode_attention_paged`` (first checked against the gather path
  on random data).

Then the engine's start-up sizing (``realtime.engine.step_audio.core.pool_bytes``): the pool
that fits in the memory left beside the bf16 weights, allocated for real, and how many
4096-position sessions it holds; the same arithmetic for FP8 weights (half the layer bytes).
Writes ``$OUT``/``bench/results/kv-pages-gpu.json`` (or ``bench/results/`` without ``$OUT``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_serving import random_decoder, step_ms  # noqa: E402
from realtime.engine.step_audio.core import kv_bytes_per_position, pool_bytes  # noqa: E402
from realtime.models.decode import DecodeRunner, RunnerOptions  # noqa: E402
from realtime.models.kv_pages import PagedKVCache  # noqa: E402
from realtime.models.qwen2 import KVCache  # noqa: E402
from realtime.models.step_audio.config import step_audio_r1_config  # noqa: E402

GIB = 1024**3
CONTEXT = 500
BATCHES = (1, 8, 32)
PAGE = 256


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(res: dict[str, Any]) -> None:
    out = Path(os.environ.get("OUT") or ROOT) / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv-pages-gpu.json").write_text(json.dumps(res, indent=1) + "\n")


def kernel_check(dev: torch.device) -> float:
    """The paged Triton decode-attention op against the gather + reductions path of
    ``attend_cache_step`` on the same random bf16 data: max abs difference."""
    from realtime.models import decode_attention  # noqa: F401 - registers the ops
    from realtime.models.attention import attend_cache_step

    gen = torch.Generator(device=dev).manual_seed(0)
    b, hq, hkv, d, p = 8, 40, 8, 128, 4
    kc = torch.randn(40, PAGE, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    vc = torch.randn(40, PAGE, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    tab = (torch.randperm(39, device=dev, generator=gen)[: b * p] + 1).view(b, p).int()
    pos = torch.randint(0, p * PAGE, (b,), device=dev, generator=gen)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, 1, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, 1, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    vis = torch.arange(p * PAGE, device=dev)[None] <= pos[:, None]
    ref = attend_cache_step(q, k, v, kc.clone(), vc.clone(), pos, pos, vis, False, tab)
    got = attend_cache_step(q, k, v, kc.clone(), vc.clone(), pos, pos, vis, True, tab)
    return float((got.float() - ref.float()).abs().max())


def table(model, cache, steps: int) -> tuple[dict[str, float], str]:
    torch._dynamo.reset()
    opts = RunnerOptions(cuda_graphs=True, compile=True, batch_sizes=BATCHES, len_buckets=(512,))
    runner = DecodeRunner(model, cache, opts)
    slots = cache.allocate(max(BATCHES))
    for s in slots:
        cache.ensure(s, CONTEXT + 3 * (steps + 3) + 8)  # the pages a session would hold
    row = {f"b{bs}": round(step_ms(runner, slots, bs, CONTEXT, steps), 3) for bs in BATCHES}
    name = runner.attention_name
    cache.free(slots)
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return row, name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    cfg = step_audio_r1_config().text
    res: dict[str, Any] = {
        "card": torch.cuda.get_device_name(dev),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.gpu_kv_pages " + " ".join(sys.argv[1:]),
        "context": CONTEXT,
        "page_size": PAGE,
    }
    res["paged_kernel_max_abs_diff"] = kernel_check(dev)
    log(f"paged kernel vs gather: max abs diff {res['paged_kernel_max_abs_diff']}")
    model = random_decoder(cfg, dev)
    torch.cuda.synchronize()
    res["bf16_weight_gib"] = round(model.weight_bytes() / GIB, 2)
    log(f"{res['card']}: weights {res['bf16_weight_gib']} GiB")
    contiguous = KVCache(cfg, 32, 1024, dev, torch.bfloat16)
    try:
        res["contiguous_ms_per_step"], res["contiguous_attention"] = table(
            model, contiguous, args.steps
        )
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res["contiguous_error"] = repr(exc)[:500]
    log(f"contiguous: {res.get('contiguous_ms_per_step')}")
    save(res)
    del contiguous
    gc.collect()
    torch.cuda.empty_cache()
    paged = PagedKVCache(cfg, 32, 1024, dev, torch.bfloat16, page_size=PAGE)
    try:
        res["paged_ms_per_step"], res["paged_attention"] = table(model, paged, args.steps)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res["paged_error"] = repr(exc)[:500]
    log(f"paged: {res.get('paged_ms_per_step')}")
    save(res)
    del paged
    gc.collect()
    torch.cuda.empty_cache()

    per_page = kv_bytes_per_position(cfg, torch.bfloat16) * PAGE
    free, total = torch.cuda.mem_get_info(dev)
    pages = pool_bytes(free, total) // per_page - 1
    res["free_gib_beside_bf16_weights"] = round(free / GIB, 2)
    res["pool_pages_bf16"] = int(pages)
    res["sessions_4k_context_bf16"] = int(pages * PAGE // 4096)
    try:
        pool = PagedKVCache(cfg, 128, 4096, dev, torch.bfloat16, page_size=PAGE, num_pages=pages)
        res["pool_allocated_gib"] = round(torch.cuda.memory_allocated(dev) / GIB, 2)
        del pool
    except Exception as exc:  # noqa: BLE001
        res["pool_error"] = repr(exc)[:500]
    layer_bytes = model.weight_bytes() - 2 * cfg.vocab_size * cfg.hidden_size * 2
    fp8_free = free + layer_bytes // 2  # FP8 layer weights: one byte instead of two
    res["sessions_4k_context_fp8_arith"] = int(
        (pool_bytes(fp8_free, total) // per_page - 1) * PAGE // 4096
    )
    log(json.dumps(res, indent=1))
    save(res)


if __name__ == "__main__":
    main()
