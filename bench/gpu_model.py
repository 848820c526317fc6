"""GPU benchmark of issue 3: the full-size Step-Audio-R1 model with random bf16 weights.

    python -m bench.gpu_model                 # from the repository root, on a CUDA machine

Measures (one GPU, batch 1, median of repeats after warm-up, timed with CUDA events):
  * ``load_s``: building the 33B model with random weights directly on the GPU
    (``random_step_audio``: allocation without host copies, then random fill on the device);
  * ``encoder_adapter_10s_ms``: encoder + adapter on the log mel of 10 s of audio (1002 frames
    -> 125 LLM embeddings), front end not included (``frontend_10s_ms`` separately);
  * ``prefill_165_ms``: the decoder over 125 audio embeddings + 40 text tokens (165 positions)
    into a static KV cache, logits of the last position (eager PyTorch, SDPA attention).
Random weights: the numbers are about speed only; the model says nothing meaningful.
Prints a table last and writes ``bench/results/gpu-model.json`` (and ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from realtime.models.step_audio.lengths import embeddings_for_samples
from realtime.models.step_audio.model import random_step_audio

ROOT = Path(__file__).resolve().parent.parent
TEXT_TOKENS = 40
AUDIO_SECONDS = 10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cuda_ms(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` on the GPU in ms (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-model.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    card = torch.cuda.get_device_name(dev)
    log(f"{card}, torch {torch.__version__}")

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = random_step_audio(device=dev, dtype=torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    log(f"random model: {n_params / 1e9:.2f}B params, {weight_gib:.1f} GiB in {load_s:.2f} s")

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(AUDIO_SECONDS * 16000)).astype(np.float32)
    pcm = torch.from_numpy(audio).to(dev)
    mel = model.logmel(pcm)
    frontend_ms, _ = cuda_ms(lambda: model.logmel(pcm), args.warmup, args.repeats)
    n_embed = embeddings_for_samples(audio.shape[0])
    emb = model.encode_mel(mel)
    assert emb.shape == (n_embed, model.cfg.text.hidden_size), emb.shape
    enc_ms, enc_all = cuda_ms(lambda: model.encode_mel(mel), args.warmup, args.repeats)
    log(f"front end {frontend_ms:.2f} ms, encoder+adapter {enc_ms:.2f} ms -> {n_embed} embeddings")

    patch = model.audio_patch_id
    text_ids = torch.randint(0, 150000, (TEXT_TOKENS,))
    ids = torch.cat([text_ids[:20], torch.full((n_embed,), patch), text_ids[20:]])[None].to(dev)
    n = ids.shape[1]
    cache = model.new_cache(1, 256)
    slots = torch.zeros(1, dtype=torch.long, device=dev)
    positions = torch.arange(n, device=dev)[None]
    with torch.inference_mode():
        embeds = model.embed(ids, emb)
        merge_ms, _ = cuda_ms(lambda: model.embed(ids, emb), args.warmup, args.repeats)

        def prefill() -> torch.Tensor:
            return model.decoder(embeds, positions, cache, slots, last_only=True)

        pre_ms, pre_all = cuda_ms(prefill, args.warmup, args.repeats)
        logits = prefill()
        assert logits.shape == (1, 1, model.cfg.text.vocab_size)
        step_e = model.decoder.embed(ids[:, -1:])
        step_p = torch.tensor([[n]], device=dev)
        step_ms, _ = cuda_ms(
            lambda: model.decoder(step_e, step_p, cache, slots), args.warmup, args.repeats
        )
    log(f"prefill {n} tokens {pre_ms:.2f} ms, one eager decode step {step_ms:.2f} ms")

    result = {
        "load_s": round(load_s, 3),
        "encoder_adapter_10s_ms": round(enc_ms, 3),
        "prefill_165_ms": round(pre_ms, 3),
        "card": card,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.gpu_model " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "torch": torch.__version__,
        "params": n_params,
        "weight_gib": round(weight_gib, 2),
        "frontend_10s_ms": round(frontend_ms, 3),
        "audio_embeddings_10s": n_embed,
        "prefill_tokens": n,
        "embed_merge_ms": round(merge_ms, 3),
        "decode_step_eager_ms": round(step_ms, 3),
        "encoder_adapter_all_ms": [round(t, 3) for t in enc_all],
        "prefill_all_ms": [round(t, 3) for t in pre_all],
        "max_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "weights": "random bf16 (no checkpoint)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("card", card),
        ("load (random 33B, on GPU)", f"{load_s:.2f} s"),
        ("front end, 10 s", f"{frontend_ms:.2f} ms"),
        (f"encoder + adapter, 10 s -> {n_embed}", f"{enc_ms:.2f} ms"),
        (f"prefill {n} (125 audio + {TEXT_TOKENS} text)", f"{pre_ms:.2f} ms"),
        ("decode step, eager, batch 1", f"{step_ms:.2f} ms"),
        ("max GPU memory", f"{result['max_memory_gib']} GiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n| what | measured |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
