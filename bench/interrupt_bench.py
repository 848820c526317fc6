"""Barge-in: does the user's speech over a spoken answer stop it when it should, and only then?

    python bench/interrupt_bench.py [--voices tune|report] [--min-speech-ms 1500]
                                    [--modes immediate,hold]
                                    [--out bench/results/interrupt-cpu.json]

A real session (realtime.session.Session: WebRTC VAD endpointer, the listener with Whisper
tiny.en, the turn controller, espeak-ng TTS; the engine is a stand-in that talks on and on)
speaks an answer at live pace. While it does, the user's channel, fed in real time in 20 ms
chunks over quiet room noise, carries one event:

- a backchannel ("uh-huh", "mm-hm", "okay", "right", "yeah") in an espeak-ng / flite voice;
- a cough (a synthesised burst: filtered noise with a sharp attack and a fast decay, twice);
- a real interruption ("Wait, stop, what about tomorrow?", ...).

Counted, for ``barge_in.mode`` immediate (any 60 ms of voice stops the answer: the old rule)
and hold (the new one): false interruptions (a backchannel or a cough stopped the answer),
missed interruptions, and for the real ones the delay from the start of the user's speech to
the stop, and from the moment the speech was recognised as an interruption (the frame that
decided it: speech sustained for ``min_speech_ms``, or a transcript, partial or not, with a
non-backchannel word) to the ``Interruption`` frame (after which no audio of the answer goes
out). Each trial's ``heard`` lists every transcript with its decode's ``avg_logprob``.

The user's channel holds the user's voice only (a client with headphones or echo
cancellation); the agent's own voice leaking into the microphone is issue 13's point 4.
Tuned on the ``tune`` voices; reported on the others.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import write_result  # noqa: E402
from bench.voices import DEFAULT_VOICES, available, speech_end, synthesize  # noqa: E402
from realtime.asr import WhisperRecognizer  # noqa: E402
from realtime.config import AgentConfig, SamplingConfig, TTSConfig  # noqa: E402
from realtime.engine.base import CancelToken, TokenEvent, TurnStats, UserTurn  # noqa: E402
from realtime.engine.worker import EngineWorker  # noqa: E402
from realtime.frames import (  # noqa: E402
    Interruption,
    OutputAudio,
    SpeechStarted,
    SpeechSustained,
    Transcript,
)
from realtime.session import Session, SharedModels  # noqa: E402
from tts import load_tts  # noqa: E402

RATE = 16000
TUNE_VOICES = ("espeak:en-us@165", "flite:slt@1.0")
REPORT_VOICES = tuple(v for v in DEFAULT_VOICES if v not in TUNE_VOICES)
BACKCHANNELS = ("Uh-huh.", "Mm-hm.", "Okay.", "Right.", "Yeah.")
INTERRUPTIONS = (
    "Wait, stop, what about tomorrow?",
    "Sorry, can I ask something else?",
    "No, that is not what I asked.",
)
LEAD_S, TAIL_S = 0.6, 2.0  # room noise before the event, and after it
ANSWER = "Our shop opens at nine in the morning and closes at six in the evening " * 4


class TalkerSession:
    """An engine session that says ``ANSWER`` at a steady pace (a stand-in for the model:
    what is measured here is the turn-taking around it)."""

    def __init__(self) -> None:
        self.stats = TurnStats()

    def listen(self, pcm16k: np.ndarray) -> None:
        pass

    def respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        for w in ANSWER.split():
            if cancel.cancelled:
                return
            time.sleep(0.02)
            yield TokenEvent("answer", w + " ")

    def commit(self, turn: UserTurn, spoken_answer: str, interrupted: bool) -> None:
        pass

    def discard(self) -> None:
        pass

    def set_instructions(self, system_prompt: str) -> None:
        pass

    def close(self) -> None:
        pass


class Talker:
    name, input_kind, interleaved_responses = "talker", "text", False

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> TalkerSession:
        return TalkerSession()

    def warmup(self) -> None:
        pass

    def close(self) -> None:
        pass


def cough(seed: int) -> np.ndarray:
    """Two bursts of band-limited noise, sharp attack, fast decay (~0.25 s each)."""
    rng = np.random.default_rng(seed)
    out = []
    for length in (0.25, 0.2):
        n = int(length * RATE)
        noise = rng.normal(0, 1, n)
        noise = np.convolve(noise, np.hanning(9) / np.hanning(9).sum(), mode="same")  # low-pass
        env = np.minimum(1, np.arange(n) / (0.01 * RATE)) * np.exp(-np.arange(n) / (0.07 * RATE))
        out += [0.4 * noise * env, np.zeros(int(0.08 * RATE))]
    return np.concatenate(out).astype(np.float32)


@dataclasses.dataclass
class Event:
    kind: str  # backchannel | cough | interruption
    label: str
    pcm: np.ndarray


def build_events(voices: tuple[str, ...]) -> list[Event]:
    events = []
    for v in voices:
        if not available(v):
            print(f"skipping {v}: not installed", file=sys.stderr)
            continue
        for text in BACKCHANNELS:
            pcm = synthesize(text, v)
            events.append(Event("backchannel", f"{v} {text}", pcm[: int(speech_end(pcm) * RATE)]))
        for text in INTERRUPTIONS[:2]:
            pcm = synthesize(text, v)
            events.append(Event("interruption", f"{v} {text}", pcm[: int(speech_end(pcm) * RATE)]))
    for seed in range(len(voices)):
        events.append(Event("cough", f"cough #{seed}", cough(seed)))
    return events


async def trial(models: SharedModels, event: Event) -> dict:
    session = Session(models, pace_output=True)
    await session.start()
    seen: list[tuple[float, object]] = []

    async def collect() -> None:
        async for frame in session.frames():
            seen.append((time.monotonic(), frame))

    collector = asyncio.create_task(collect())
    rng = np.random.default_rng(0)
    noise = lambda s: rng.normal(0, 0.002, int(s * RATE)).astype(np.float32)  # noqa: E731
    room = noise(0.6)  # the room before the answer (its onset from digital silence is a blip)
    for i in range(0, room.size, RATE // 50):
        await session.push_audio(room[i : i + RATE // 50], RATE)
        await asyncio.sleep(0.02)
    await session.respond("When are you open?")
    for _ in range(200):  # until the answer is heard
        if any(isinstance(f, OutputAudio) for _, f in seen):
            break
        await asyncio.sleep(0.02)
    user = np.concatenate([noise(LEAD_S), event.pcm + noise(event.pcm.size / RATE), noise(TAIL_S)])
    t0 = time.monotonic()
    wall_onset = t0 + LEAD_S
    for i in range(0, user.size, RATE // 50):
        await session.push_audio(user[i : i + RATE // 50], RATE)
        await asyncio.sleep(max(0.0, t0 + (i + RATE // 50) / RATE - time.monotonic()))
    await asyncio.sleep(0.3)
    await session.close()
    collector.cancel()
    cut = next(((t, f) for t, f in seen if isinstance(f, Interruption)), None)
    row: dict = {"kind": event.kind, "label": event.label, "interrupted": cut is not None}
    if cut is not None:
        t_cut = cut[0]
        deciders = [
            (t, f)
            for t, f in seen
            if t <= t_cut and isinstance(f, (SpeechStarted, SpeechSustained, Transcript))
        ]
        row["onset_to_stop_s"] = round(t_cut - wall_onset, 3)
        row["recognised_to_stop_s"] = round(t_cut - deciders[-1][0], 4) if deciders else None
        row["decided_by"] = type(deciders[-1][1]).__name__ if deciders else None
        first_id = next(f.response_id for _, f in seen if isinstance(f, OutputAudio))
        late = [
            t
            for t, f in seen
            if isinstance(f, OutputAudio) and f.response_id == first_id and t > t_cut
        ]
        row["audio_after_stop"] = len(late)
    row["transcripts"] = [f.text for _, f in seen if isinstance(f, Transcript) and f.final]
    row["heard"] = [  # every transcript: partial / pause / final, and its decode's score
        f"{'final' if f.final else 'pause' if f.candidate else 'partial'}: {f.text!r}"
        + ("" if f.avg_logprob is None else f" ({f.avg_logprob:.2f})")
        for _, f in seen
        if isinstance(f, Transcript)
    ]
    return row


def summarise(rows: list[dict]) -> dict:
    def of(kind: str) -> list[dict]:
        return [r for r in rows if r["kind"] == kind]

    real = [r for r in of("interruption") if r["interrupted"]]

    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)), 3) if xs else None

    onset = [r["onset_to_stop_s"] for r in real]
    recog = [r["recognised_to_stop_s"] for r in real if r["recognised_to_stop_s"] is not None]
    return {
        "false_interruptions_backchannel": f"{sum(r['interrupted'] for r in of('backchannel'))}/{len(of('backchannel'))}",
        "false_interruptions_cough": f"{sum(r['interrupted'] for r in of('cough'))}/{len(of('cough'))}",
        "missed_interruptions": f"{len(of('interruption')) - len(real)}/{len(of('interruption'))}",
        "onset_to_stop_p50_s": pct(onset, 50),
        "onset_to_stop_p95_s": pct(onset, 95),
        "recognised_to_stop_max_ms": round(1000 * max(recog), 2) if recog else None,
        "answer_audio_after_stop": sum(r.get("audio_after_stop", 0) for r in rows),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voices", choices=("tune", "report"), default="report")
    ap.add_argument("--min-speech-ms", type=int, default=None)
    ap.add_argument("--modes", default="immediate,hold", help="barge_in.mode values to run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    voices = TUNE_VOICES if args.voices == "tune" else REPORT_VOICES
    events = build_events(voices)
    base = AgentConfig()
    if args.min_speech_ms is not None:
        base.barge_in.min_speech_ms = args.min_speech_ms
    asr = WhisperRecognizer(base.asr)
    tts = load_tts(TTSConfig(backend="espeak", voice="en-us"))
    results = {}
    for mode in args.modes.split(","):
        cfg = dataclasses.replace(base, barge_in=dataclasses.replace(base.barge_in, mode=mode))
        worker = EngineWorker()
        models = SharedModels(cfg, asr, ThreadPoolExecutor(1), Talker(), worker, tts)  # type: ignore[arg-type]
        rows = [await trial(models, e) for e in events]
        worker.close()
        results[mode] = {"summary": summarise(rows), "trials": rows}
        print(mode, json.dumps(results[mode]["summary"]), flush=True)
    print(f"\n{len(events)} events per mode; voices: {', '.join(voices)}")
    cols = (
        "false_interruptions_backchannel",
        "false_interruptions_cough",
        "missed_interruptions",
        "onset_to_stop_p50_s",
        "onset_to_stop_p95_s",
        "recognised_to_stop_max_ms",
    )
    print(f"{'mode':10} " + " ".join(f"{c.replace('_', ' ')[:18]:>18}" for c in cols))
    for mode, r in results.items():
        print(f"{mode:10} " + " ".join(f"{r['summary'][c]!s:>18}" for c in cols))
    if args.out:
        write_result(
            args.out,
            {
                "voices": list(voices),
                "tuning_voices": list(TUNE_VOICES),
                "barge_in": dataclasses.asdict(base.barge_in),
                "modes": results,
            },
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
