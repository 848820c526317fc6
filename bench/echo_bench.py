"""Echo cancellation (realtime/echo.py) in simulated rooms: the far end (what the speakers
play) is speech in espeak-ng and flite voices; it comes back into the microphone late (40, 80
or 120 ms), through a synthetic decaying impulse response (reverberation 30 or 80 ms), at a
gain, over a quiet room's noise floor (-61 dBFS); for the last 2.5 s a near-end voice talks
over it (double talk).

Per room: the echo return loss enhancement (ERLE, echo energy in over residual out, on the
echo-only part after the first 2 s and over the first 2 s), how many echo-only 20 ms frames
WebRTC's VAD (mode 2, the pipeline's) calls speech before and after cancellation, how much the
near-end voice loses in double talk, and the processing time per 10 ms frame.

    python bench/echo_bench.py [--out bench/results/echo-cpu.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import webrtcvad

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.voices import RATE, available, synthesize  # noqa: E402
from realtime.echo import EchoCanceller, echo_return_loss_enhancement  # noqa: E402

FAR_TEXT = (
    "Paris is the capital of France. It lies on the river Seine and is known for its "
    "museums, its food and its long history. Most visitors start with the Louvre."
)
NEAR_TEXT = "Sorry, can you tell me about Germany instead?"
FAR_VOICES = ("espeak:en-us@165", "flite:slt@1.0", "espeak:en-gb-x-rp+f3@140")
NEAR_VOICE = "flite:rms@1.0"
ROOMS = [  # (delay ms, reverberation time constant ms, echo gain)
    (40, 30, 0.3),
    (80, 30, 0.5),
    (120, 30, 0.7),
    (80, 80, 0.5),
    (120, 80, 0.9),
]
NOISE_RMS = 30.0
FRAME = RATE // 50  # 20 ms


def room_echo(far: np.ndarray, delay_ms: int, tau_ms: int, gain: float) -> np.ndarray:
    rng = np.random.default_rng(delay_ms * 1000 + tau_ms)
    t = np.arange(int(5 * tau_ms / 1000 * RATE)) / RATE
    ir = rng.standard_normal(t.size) * np.exp(-t / (tau_ms / 1000))
    ir = gain * ir / np.sqrt(np.sum(ir**2))
    d = int(delay_ms / 1000 * RATE)
    wet = np.convolve(far, ir)[: far.size]
    return np.concatenate([np.zeros(d), wet[: far.size - d]])


def vad_fraction(x: np.ndarray, vad: webrtcvad.Vad) -> float:
    x = np.clip(x, -32768, 32767).astype(np.int16)
    n = x.size // FRAME
    if n == 0:
        return 0.0
    hits = sum(vad.is_speech(x[i * FRAME : (i + 1) * FRAME].tobytes(), RATE) for i in range(n))
    return hits / n


def run_room(far: np.ndarray, near: np.ndarray, room: tuple[int, int, float]) -> dict:
    echo = room_echo(far, *room)
    rng = np.random.default_rng(7)
    noise = rng.standard_normal(far.size) * NOISE_RMS
    mic = np.clip(echo + near + noise, -32768, 32767).astype(np.int16)
    aec = EchoCanceller()
    out = np.zeros(far.size, np.int16)
    block = RATE // 100
    t0 = time.perf_counter()
    for i in range(0, far.size - block + 1, block):
        aec.played(far[i : i + block].astype(np.int16), RATE)
        out[i : i + block] = aec.process(mic[i : i + block], RATE)
    per_frame_ms = (time.perf_counter() - t0) / (far.size // block) * 1000
    talk = np.nonzero(near)[0]
    dt_start, dt_end = int(talk[0]), int(talk[-1]) + 1
    conv = 2 * RATE
    vad = webrtcvad.Vad(2)
    echo_only = slice(conv, dt_start)
    loud = np.abs(echo[echo_only]) > 0  # the whole echo-only span
    assert loud.any()
    return {
        "delay_ms": room[0],
        "reverb_ms": room[1],
        "gain": room[2],
        "erle_db": echo_return_loss_enhancement(echo[echo_only], out[echo_only]),
        "erle_first_2s_db": echo_return_loss_enhancement(echo[:conv], out[:conv]),
        "vad_speech_before": vad_fraction(mic[echo_only], vad),
        "vad_speech_after": vad_fraction(out[echo_only], vad),
        "near_change_db": 20
        * np.log10(
            np.sqrt(np.mean(out[dt_start:dt_end].astype(float) ** 2))
            / np.sqrt(np.mean(near[dt_start:dt_end] ** 2))
        ),
        "ms_per_10ms_frame": per_frame_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/echo-cpu.json")
    args = ap.parse_args()
    near_speech = synthesize(NEAR_TEXT, NEAR_VOICE).astype(np.float64) * 32767 * 0.7
    rows = []
    for voice in FAR_VOICES:
        if not available(voice):
            print(f"skipping {voice}: not installed")
            continue
        far = synthesize(FAR_TEXT, voice).astype(np.float64) * 32767
        far = np.concatenate([far, far[: 3 * RATE]])  # long enough for the double talk
        near = np.zeros_like(far)
        start = far.size - near_speech.size - RATE // 4
        near[start : start + near_speech.size] = near_speech
        for room in ROOMS:
            row = {"far_voice": voice, **run_room(far, near, room)}
            rows.append(row)
    head = "far voice                 delay reverb gain  ERLE  ERLE<2s  VAD echo in->out  near dB  ms/frame"
    print(head)
    for r in rows:
        print(
            f"{r['far_voice']:<25} {r['delay_ms']:>4}ms {r['reverb_ms']:>4}ms {r['gain']:>4.1f}"
            f" {r['erle_db']:5.1f} {r['erle_first_2s_db']:7.1f}"
            f"   {r['vad_speech_before']:6.1%} -> {r['vad_speech_after']:5.1%}"
            f"  {r['near_change_db']:6.1f}  {r['ms_per_10ms_frame']:7.3f}"
        )
    erle = [r["erle_db"] for r in rows]
    summary = {
        "erle_db_median": float(np.median(erle)),
        "erle_db_min": float(np.min(erle)),
        "erle_first_2s_db_median": float(np.median([r["erle_first_2s_db"] for r in rows])),
        "vad_speech_after_max": float(max(r["vad_speech_after"] for r in rows)),
        "near_change_db_median": float(np.median([r["near_change_db"] for r in rows])),
    }
    print(json.dumps(summary, indent=1))
    out = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "command": "python bench/echo_bench.py",
        "summary": summary,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
