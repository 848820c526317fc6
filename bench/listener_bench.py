"""How the listener's commit policy changes what Whisper hears: words committed at every pause
the endpointer reports against only at phrase boundaries (``asr.commit_pause_ms``), on the same
synthesised audio in the same run, with whole-turn decoding as the reference.

    python bench/listener_bench.py [--repeats 2] [--out bench/results/listener-cpu.json]

Each question is spoken by Piper (which varies from one synthesis to the next) at two speaking
speeds, fed in 20 ms chunks through the endpointer and the listener; every pause decode is
awaited before the audio goes on (as on a fast machine, where each pause decode finishes before
the user resumes, so every pause can commit). Prints mean word error rate and the seconds of
audio decoded per turn, and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import platform
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jiwer  # noqa: E402

from bench.questions import QUESTIONS  # noqa: E402
from realtime.asr import Heard, WhisperRecognizer  # noqa: E402
from realtime.audio import PIPELINE_RATE, resample, to_float32  # noqa: E402
from realtime.config import ASRConfig, load_config  # noqa: E402
from realtime.listener import Listener  # noqa: E402
from realtime.vad import Endpointer  # noqa: E402
from tts import load_tts  # noqa: E402

LONG_QUESTIONS = [  # with commas: the endpointer reports pauses inside the turn
    "I would like to know, if you don't mind, what the weather will be like tomorrow in Paris.",
    "Please tell me a short story about a dragon, a knight and a princess.",
    "My favourite colours are red, green and blue; which one do you like best?",
    "Could you explain how a rainbow forms after the rain, and why it has so many colours?",
]
POLICIES = {
    "commit at every pause (before)": {"commit_pause_ms": 0},
    "commit at phrase boundaries (now)": {},
}


def norm(text: str) -> str:
    return " ".join(
        "".join(
            c for c in text.lower().replace("colour", "color") if c.isalnum() or c.isspace()
        ).split()
    )


class CountingASR:
    def __init__(self, asr: WhisperRecognizer) -> None:
        self.asr, self.seconds = asr, 0.0

    def transcribe(self, audio: np.ndarray, prompt: str = "") -> str:
        self.seconds += len(audio) / PIPELINE_RATE
        return self.asr.transcribe(audio, prompt)

    def hear(self, audio: np.ndarray, prompt: str = "") -> Heard:
        self.seconds += len(audio) / PIPELINE_RATE
        return self.asr.hear(audio, prompt)


async def listen(pcm: np.ndarray, cfg: ASRConfig, asr: CountingASR, vad_cfg) -> str:
    executor = ThreadPoolExecutor(1)
    endpointer = Endpointer(vad_cfg, cfg.speculative_after_ms)
    listener = Listener(asr, cfg, executor)  # type: ignore[arg-type]
    prefix = int(vad_cfg.prefix_padding_ms * PIPELINE_RATE / 1000)
    step = PIPELINE_RATE // 50
    text = ""
    for i in range(0, len(pcm), step):
        for ev in endpointer.process(pcm[i : i + step]):
            if ev.kind == "start":
                t0 = max(0.0, ev.t - prefix / PIPELINE_RATE)
                listener.start(t0, pcm[int(t0 * PIPELINE_RATE) : i])
            elif ev.kind == "pause":
                listener.on_pause(ev.t)
                await listener.candidate()
            elif ev.kind == "resume":
                listener.on_resume(ev.t)
            elif ev.kind == "stop":
                text = (await listener.final()).text
        if listener.active:
            listener.append(pcm[i : i + step])
    executor.shutdown()
    return text


async def run(args: argparse.Namespace) -> dict:
    cfg = load_config("embedded")
    tts = load_tts(cfg.tts)
    asr = CountingASR(WhisperRecognizer(cfg.asr))
    questions = QUESTIONS + LONG_QUESTIONS
    scores: dict[str, dict[str, list[float]]] = {
        name: {"wer": [], "decoded_s": []}
        for name in [*POLICIES, "whole turn at the end (reference)"]
    }
    examples: list[dict[str, str]] = []
    for _ in range(args.repeats):
        for speed in (1.0, 0.85):
            for q in questions:
                speech = resample(
                    to_float32(tts.synthesize(q, speaking_rate=speed)), tts.sample_rate, 16000
                )
                lead, tail = np.zeros(4800, np.float32), np.zeros(PIPELINE_RATE, np.float32)
                pcm = np.concatenate([lead, speech, tail])
                row = {"question": q, "speed": str(speed)}
                for name, override in POLICIES.items():
                    asr.seconds = 0.0
                    text = await listen(pcm, dataclasses.replace(cfg.asr, **override), asr, cfg.vad)
                    scores[name]["wer"].append(jiwer.wer(norm(q), norm(text)))
                    scores[name]["decoded_s"].append(asr.seconds)
                    row[name] = text
                asr.seconds = 0.0
                whole = asr.transcribe(speech)
                ref = "whole turn at the end (reference)"
                scores[ref]["wer"].append(jiwer.wer(norm(q), norm(whole)))
                scores[ref]["decoded_s"].append(asr.seconds)
                examples.append(row)
    table = {
        name: {
            "wer_mean": statistics.mean(s["wer"]),
            "turns_with_errors": sum(w > 0 for w in s["wer"]),
            "decoded_s_per_turn": statistics.mean(s["decoded_s"]),
        }
        for name, s in scores.items()
    }
    return {
        "policies": table,
        "turns": len(examples),
        "machine": f"{platform.node()} {platform.machine()} {len(__import__('os').sched_getaffinity(0))} cores",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "examples": examples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/listener-cpu.json")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['turns']} turns, {result['machine']}, {result['date']}")
    print(
        f"{'policy':<36} | {'mean WER':>8} | {'turns with errors':>17} | {'audio decoded/turn':>18}"
    )
    for name, row in result["policies"].items():
        print(
            f"{name:<36} | {row['wer_mean']:>8.3f} | {row['turns_with_errors']:>17} | "
            f"{row['decoded_s_per_turn']:>16.2f} s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
