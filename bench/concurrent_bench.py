"""Two callers at once on the offline stack: does the second caller's answer wait for the first
one's to be written? Interleaved answers (the default for SmolLM2) against answers run one after
another (``interleaved_responses = False``), in the same sitting.

    python bench/concurrent_bench.py [--repeats 1] [--gap 1.0] [--out bench/results/cpu-concurrent.json]

Caller A asks a question with a long answer ("Why is the sky blue?": about 90 tokens, ~3 s of
decoding on two cores) and hears it out; caller B's question ends ``--gap`` seconds after A's,
while A's answer is still being written. Both are fed live-paced in 20 ms chunks; first-packet
latency is timed from each question's true end of speech, as in ``cpu_bench.py``. Prints a table
and writes JSON.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_bench import LEAD_S, RATE, TAIL_S, one_turn, speech_end  # noqa: E402
from bench.questions import QUESTIONS  # noqa: E402
from realtime.audio import resample, to_float32  # noqa: E402
from realtime.config import load_config  # noqa: E402
from realtime.runtime import Runtime  # noqa: E402

LONG = "Why is the sky blue?"


def spoken(runtime: Runtime, text: str) -> tuple[np.ndarray, float]:
    tts = runtime.tts
    pcm = resample(to_float32(tts.synthesize(text)), tts.sample_rate, RATE)
    lead, tail = np.zeros(int(LEAD_S * RATE), np.float32), np.zeros(int(TAIL_S * RATE), np.float32)
    return np.concatenate([lead, pcm, tail]), LEAD_S + speech_end(pcm)


async def pair(
    runtime: Runtime, a: tuple[np.ndarray, float], b: tuple[np.ndarray, float], gap: float
):
    """B starts so that its true end comes ``gap`` s after A's."""
    delay = max(0.0, a[1] + gap - b[1])
    b_pcm = np.concatenate([np.zeros(int(delay * RATE), np.float32), b[0]])
    ra, rb = await asyncio.gather(
        one_turn(runtime, a[0], a[1], whole_answer=True), one_turn(runtime, b_pcm, b[1] + delay)
    )
    return ra, rb


async def run(args: argparse.Namespace) -> dict:
    runtime = await Runtime.create(load_config("embedded"))
    long_q = spoken(runtime, LONG)
    others = [(q, spoken(runtime, q)) for q in QUESTIONS if q != LONG]
    modes = {}
    for mode, interleaved in (
        ("interleaved (now)", True),
        ("one answer at a time (before)", False),
    ):
        runtime.engine.interleaved_responses = interleaved
        rows = []
        for _ in range(args.repeats):
            for q, b in others:
                ra, rb = await pair(runtime, long_q, b, args.gap)
                rows.append({"b_question": q, "a": ra, "b": rb})
                print(
                    f"{mode:<30} A {ra['first_packet_true_s']:.3f} s  B {rb['first_packet_true_s']!s:.5} s  {q!r} -> {rb['answer']!r:.50}",
                    flush=True,
                )
        b_lat = [
            r["b"]["first_packet_true_s"] for r in rows if r["b"]["first_packet_true_s"] is not None
        ]
        a_lat = [
            r["a"]["first_packet_true_s"] for r in rows if r["a"]["first_packet_true_s"] is not None
        ]
        modes[mode] = {
            "b_first_packet_s": {"p50": statistics.median(b_lat), "max": max(b_lat)},
            "a_first_packet_s": {"p50": statistics.median(a_lat), "max": max(a_lat)},
            "answered": f"{len(b_lat)}/{len(rows)}",
            "turns": rows,
        }
    await runtime.close()
    return {
        "modes": modes,
        "gap_s": args.gap,
        "machine": f"{platform.node()} {platform.machine()} {len(os.sched_getaffinity(0))} cores",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gap", type=float, default=1.0, help="B's end of speech after A's, seconds")
    ap.add_argument("--out", default="bench/results/cpu-concurrent.json")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\ntwo callers, B ends {result['gap_s']} s after A; {result['machine']}; {result['date']}"
    )
    print(f"{'mode':<32} | {'B first packet p50':>18} | {'B max':>7} | {'A first packet p50':>18}")
    for mode, m in result["modes"].items():
        b, a = m["b_first_packet_s"], m["a_first_packet_s"]
        print(f"{mode:<32} | {b['p50']:>16.3f} s | {b['max']:>5.3f} s | {a['p50']:>16.3f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
