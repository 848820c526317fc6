"""The audio encoder's CUDA graphs against the eager encoder (ENGINE-ONLY): full-size
Step-Audio-R1 front end, encoder (32 layers, width 1280) and adapter with random bf16 weights
(the decoder cut to one layer: it is not timed), on one GPU.

    python bench/gpu_encoder.py            # from the repository root, on a CUDA machine
    python bench/gpu_encoder.py --tiny     # the tests' tiny model on the CPU (a smoke run)

For pieces of the growing window's lengths (multiples of 640 ms) and an end-of-turn tail, it
times ``encode_piece`` (eager) and ``EncoderGraphs.encode`` (a graph replay), wall-clock
medians synchronised after each call, and the host time a call takes before it returns (what
the engine thread spends launching it, unsynchronised: the eager encoder's launches are what
contention slows). Checks the two agree (relative L2, worst cosine). Prints a table last and
writes ``bench/results/gpu-encoder.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_prefill_batch import timed  # noqa: E402
from realtime.engine.step_audio.encoding import encode_piece  # noqa: E402
from realtime.models.step_audio.config import step_audio_r1_config  # noqa: E402
from realtime.models.step_audio.encoder_graphs import EncoderGraphs  # noqa: E402
from realtime.models.step_audio.model import random_step_audio  # noqa: E402

SECONDS = (0.64, 1.28, 2.56, 3.3, 5.12, 10.24, 24.96)


def host_ms(fn, runs: int, sync) -> float:  # noqa: ANN001 - a callable and a sync
    """Median ms a call takes to return, the device drained before each."""
    out = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    sync()
    return statistics.median(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model on the CPU")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu-encoder.json"))
    args = ap.parse_args(argv)
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from step_audio_fixtures import tiny_config

        cfg, dev, dtype = tiny_config(), torch.device("cpu"), torch.float32
    else:
        full = step_audio_r1_config()
        cfg = dataclasses.replace(full, text=dataclasses.replace(full.text, num_hidden_layers=1))
        dev, dtype = torch.device("cuda"), torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = random_step_audio(cfg, device=dev, dtype=dtype)
    graphs = EncoderGraphs(model)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        graphs.capture()
    capture_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    rows = []
    with torch.inference_mode():
        for s in SECONDS:
            pcm = (0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32)
            eager = encode_piece(model, pcm).float()
            graph = graphs.encode(pcm).float()
            rel = float((graph - eager).norm() / eager.norm())
            cos = float(torch.nn.functional.cosine_similarity(graph, eager, dim=-1).min())
            rows.append({
                "seconds": s,
                "embeddings": int(eager.shape[0]),
                "eager_ms": timed(lambda p=pcm: encode_piece(model, p), args.runs, sync),
                "graph_ms": timed(lambda p=pcm: graphs.encode(p), args.runs, sync),
                "eager_host_ms": host_ms(lambda p=pcm: encode_piece(model, p), args.runs, sync),
                "graph_host_ms": host_ms(lambda p=pcm: graphs.encode(p), args.runs, sync),
                "rel_l2": rel,
                "min_cosine": cos,
            })  # fmt: skip
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    result = {
        "card": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu_encoder.py " + " ".join(argv or sys.argv[1:]),
        "weights": "random, full-size encoder and adapter" if not args.tiny else "tiny, CPU",
        "graphs": len(graphs.graphs),
        "capture_s": round(capture_s, 2),
        "rows": rows,
    }
    print(f"{name}: {len(graphs.graphs)} graphs captured in {capture_s:.1f} s")
    print(f"{'audio s':>8} {'emb':>5} {'eager ms':>9} {'graph ms':>9} {'eager host':>11} "
          f"{'graph host':>11} {'rel L2':>8} {'min cos':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['seconds']:8.2f} {r['embeddings']:5d} {r['eager_ms']:9.2f} {r['graph_ms']:9.2f}"
              f" {r['eager_host_ms']:11.2f} {r['graph_host_ms']:11.2f} {r['rel_l2']:8.4f}"
              f" {r['min_cosine']:8.4f}")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
