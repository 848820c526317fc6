"""Why is telephone-band (8 kHz) speech misheard? The listener's short-window decoding against
a 30 s window and against plain faster-whisper (beam 5) on the whole utterance, at 16 and
8 kHz, on espeak-ng and flite voices speaking bench/questions.py; and where the VAD puts the
start of speech at each rate (a late start would cut the first word from the listener's audio).

    python bench/asr_narrowband.py [--out bench/results/asr-narrowband.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

import jiwer
import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.questions import QUESTIONS  # noqa: E402
from bench.voices import DEFAULT_VOICES, RATE, available, synthesize  # noqa: E402
from realtime.asr import WhisperRecognizer  # noqa: E402
from realtime.config import load_config  # noqa: E402
from realtime.vad import Endpointer  # noqa: E402


def norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip() or "-"


def first_loud(x: np.ndarray) -> float:
    f = x[: len(x) // 160 * 160].reshape(-1, 160)
    return float(np.where(np.sqrt((f**2).mean(1)) > 0.01)[0][0]) * 0.01


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/asr-narrowband.json")
    args = ap.parse_args()
    cfg = load_config("embedded")
    rec = WhisperRecognizer(cfg.asr)
    wer: dict[str, list[float]] = {}
    vad_late: dict[int, list[float]] = {16000: [], 8000: []}
    voices = [v for v in DEFAULT_VOICES if available(v)]
    for voice in voices:
        for q in QUESTIONS:
            clip = synthesize(q, voice)
            for rate in (16000, 8000):
                x = (
                    clip
                    if rate == RATE
                    else soxr.resample(soxr.resample(clip, RATE, rate), rate, RATE)
                )
                x = np.concatenate([np.zeros(4800, np.float32), x.astype(np.float32),
                                    np.zeros(3200, np.float32)])  # fmt: skip
                hyps = {"listener short window (pad 2 s)": rec.transcribe(x)}
                pad, rec.pad_s = rec.pad_s, 30.0 - len(x) / RATE
                hyps["same decode, 30 s window"] = rec.transcribe(x)
                rec.pad_s = pad
                segs, _ = rec._model.transcribe(x, beam_size=5)
                hyps["plain faster-whisper, beam 5"] = " ".join(s.text for s in segs)
                for name, hyp in hyps.items():
                    wer.setdefault(f"{rate // 1000} kHz, {name}", []).append(
                        jiwer.wer(norm(q), norm(hyp))
                    )
                ep = Endpointer(cfg.vad, cfg.asr.speculative_after_ms)
                events = []
                for i in range(0, len(x), 320):
                    events += ep.process(x[i : i + 320])
                start = next(e.t for e in events if e.kind == "start")
                vad_late[rate].append(start - first_loud(x))
    rows = {k: {"mean_wer": float(np.mean(v)), "wrong": int(sum(w > 0 for w in v)), "n": len(v)}
            for k, v in sorted(wer.items())}  # fmt: skip
    print(f"{'condition':48s} {'mean WER':>8s} {'wrong':>8s}")
    for k, r in rows.items():
        print(f"{k:48s} {r['mean_wer']:8.3f} {r['wrong']:>4d}/{r['n']}")
    for rate, late in vad_late.items():
        print(f"VAD start - first loud frame at {rate // 1000} kHz: max {max(late):+.3f} s")
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "voices": voices,
        "wer": rows,
        "vad_start_minus_first_loud_s": {str(k): [min(v), max(v)] for k, v in vad_late.items()},
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
