"""First-packet latency of the offline default stack, live-paced, on this machine.

Each question is spoken (Piper, made here), fed to a session in 20 ms chunks at real-time pace
exactly as ``run_agent.py --file Q.wav --realtime`` does, and timed from the *true* end of
speech (known from the synthesis) to the first audio packet the session hands out.

    python bench/cpu_bench.py [--repeats 2] [--config embedded] [--out bench/results/cpu-embedded.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.questions import QUESTIONS  # noqa: E402
from realtime.audio import resample, to_float32  # noqa: E402
from realtime.config import load_config  # noqa: E402
from realtime.frames import EndFrame, OutputAudio, TurnMetrics  # noqa: E402
from realtime.runtime import Runtime  # noqa: E402

LEAD_S, TAIL_S, STEP_S = 0.5, 6.0, 0.02
RATE = 16000


def speech_end(pcm: np.ndarray) -> float:
    """Seconds to the last 10 ms frame louder than -40 dBFS: the true end of speech."""
    frames = pcm[: len(pcm) // 160 * 160].reshape(-1, 160)
    loud = np.where(np.sqrt((frames**2).mean(axis=1)) > 0.01)[0]
    return (loud[-1] + 1) * 0.01


async def one_turn(
    runtime: Runtime, pcm: np.ndarray, true_end_s: float, whole_answer: bool = False
) -> dict[str, object]:
    """One session, one spoken question fed live; ``whole_answer``: let the answer play out
    (by default it is cancelled 0.5 s after the first packet, which is what is measured)."""
    session = runtime.new_session(pace_output=True)
    await session.start()
    first_audio: float | None = None
    metrics: TurnMetrics | None = None

    async def read() -> None:
        nonlocal first_audio, metrics
        async for frame in session.frames():
            if isinstance(frame, OutputAudio) and first_audio is None:
                first_audio = time.monotonic()
            elif isinstance(frame, TurnMetrics) and metrics is None:
                metrics = frame
            elif isinstance(frame, EndFrame):
                return

    reader = asyncio.create_task(read())
    step = int(STEP_S * RATE)
    t0 = time.monotonic()
    for i in range(0, len(pcm), step):
        due = t0 + (i + step) / RATE
        await session.push_audio(pcm[i : i + step], RATE, wall_arrival=due)
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if metrics is not None:
            break
        if not whole_answer and first_audio is not None and time.monotonic() - first_audio > 0.5:
            await session.cancel()  # the first packet is what we measure: skip the rest
    await session.end()
    await reader
    await session.close()
    wall_true_end = t0 + true_end_s
    out: dict[str, object] = {
        "first_packet_true_s": None if first_audio is None else first_audio - wall_true_end,
        "first_packet_vad_s": None if metrics is None else metrics.first_packet_s,
        "transcript": None if metrics is None else metrics.transcript,
        "answer": None if metrics is None else metrics.answer,
    }
    if metrics is not None:
        out["breakdown"] = metrics.breakdown
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="embedded")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the question list")
    ap.add_argument("--out", default="bench/results/cpu-embedded.json")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. engine.speculative=false (YAML value)",
    )
    args = ap.parse_args()

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = load_config(args.config, overrides)
    t0 = time.monotonic()
    runtime = await Runtime.create(config)
    load_s = time.monotonic() - t0
    questions = []
    for q in QUESTIONS:
        spoken = to_float32(runtime.tts.synthesize(q, speaking_rate=1.05))  # type: ignore[attr-defined]
        pcm = resample(spoken, runtime.tts.sample_rate, RATE)
        pcm = np.concatenate(
            [
                np.zeros(int(LEAD_S * RATE), np.float32),
                pcm,
                np.zeros(int(TAIL_S * RATE), np.float32),
            ]
        )
        questions.append((q, pcm, speech_end(pcm)))

    turns = []
    for r in range(args.repeats):
        for q, pcm, end in questions:
            res = await one_turn(runtime, pcm, end)
            res["question"] = q
            res["repeat"] = r
            turns.append(res)
            fp = res["first_packet_true_s"]
            print(
                f"  {fp if fp is None else round(fp, 3)!s:>6} s  {q!r} -> {res['answer']!r}",
                flush=True,
            )
    await runtime.close()

    fps = [t["first_packet_true_s"] for t in turns if t["first_packet_true_s"] is not None]
    keys = [
        "endpoint_s",
        "transcript_s",
        "response_start_s",
        "first_token_s",
        "first_answer_token_s",
        "first_audio_ready_s",
        "released_s",
        "first_audio_packet_s",
    ]
    breakdown = {
        k: statistics.median(
            [
                t["breakdown"][k]
                for t in turns
                if "breakdown" in t and t["breakdown"].get(k) is not None
            ]
        )
        for k in keys
    }
    result = {
        "first_packet_s": {
            "p50": pct(fps, 50),
            "max": max(fps) if fps else None,
            "min": min(fps) if fps else None,
        },
        "first_packet_from": "true end of speech (synthesis ground truth), live-paced input",
        "turns": len(turns),
        "answered": len(fps),
        "breakdown_p50_s": breakdown,
        "load_s": round(load_s, 2),
        "config": args.config,
        "overrides": args.set,
        "vad_silence_duration_ms": config.vad.silence_duration_ms,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "date": dt.date.today().isoformat(),
        "command": "python bench/cpu_bench.py " + " ".join(sys.argv[1:]),
        "turn_details": turns,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")

    print(
        f"\nfirst-packet latency, {len(fps)}/{len(turns)} turns answered, config {args.config} "
        f"(end-of-speech detection {config.vad.silence_duration_ms} ms included)"
    )
    print(f"{'what':34} {'p50 (s)':>8}")
    for k in keys:
        print(f"{k:34} {breakdown[k]:8.3f}")
    print(f"{'first packet from true end: p50':34} {result['first_packet_s']['p50']:8.3f}")
    print(f"{'first packet from true end: max':34} {result['first_packet_s']['max']:8.3f}")
    print(f"{'target (Step-Audio-R1 Realtime)':34} {0.92:8.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
