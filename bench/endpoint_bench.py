"""End of turn: the silence timer alone against the Smart Turn v3 model (semantic end of turn),
on spoken utterances with and without a pause in mid-sentence.

    python bench/endpoint_bench.py [--voices tune|report] [--threshold 0.5]
                                   [--out bench/results/endpoint-cpu.json]

Each utterance is synthesised by espeak-ng / flite voices (bench/voices.py): complete sentences,
and sentences cut in two with silence between the halves ("I'd like to book a table for" +
0.8 s + "two people tonight."). The audio goes through the real turn detector stage in 20 ms
chunks (realtime/stages/detector.py: WebRTC VAD endpointer, and for ``semantic`` the model on
its thread, awaited at each pause as the detector does live).

- **endpoint delay**: when the turn was decided, from the true end of speech (the end of the
  clip's last loud 10 ms, not the VAD's); for a decision by the model its inference time (wall
  clock on this machine) is added, since live audio goes on while it runs;
- **false cut-off**: the turn ended inside the mid-sentence pause.

Thresholds are tuned on the ``tune`` voices only; the figures reported are of the ``report``
voices (``bench/voices.py DEFAULT_VOICES`` less the tuning ones).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import write_result  # noqa: E402
from bench.voices import DEFAULT_VOICES, available, speech_end, synthesize  # noqa: E402
from realtime import endpoint  # noqa: E402
from realtime.config import AgentConfig, EndOfTurnConfig  # noqa: E402
from realtime.context import SessionContext, SessionOptions, Tasks  # noqa: E402
from realtime.frames import Frame, InputAudio, SpeechStopped  # noqa: E402
from realtime.stages import Stage  # noqa: E402
from realtime.stages.detector import TurnDetector  # noqa: E402

RATE = 16000
TUNE_VOICES = ("espeak:en-us@165", "flite:slt@1.0")
REPORT_VOICES = tuple(v for v in DEFAULT_VOICES if v not in TUNE_VOICES)

COMPLETE = (
    "What is the weather like in Paris tomorrow?",
    "Please cancel my order from last week.",
    "I need to change my flight to Monday.",
    "Can you tell me my account balance?",
    "Thanks, that is all I needed.",
    "My package never arrived.",
)
# (first half, second half): the pause falls where the sentence plainly goes on
PAUSED = (
    ("I'd like to book a table for", "two people tonight."),
    ("My account number is", "four five six seven."),
    ("Can you send the invoice to", "my office address?"),
    ("I want to change my", "delivery date."),
    ("The problem started when I", "updated the app."),
    ("Could you check whether the", "refund went through?"),
)
PAUSES_S = (0.6, 0.9, 1.2)
LEAD_S, TAIL_S = 0.3, 2.5


@dataclasses.dataclass
class Clip:
    voice: str
    text: str
    pcm: np.ndarray
    speech_end_s: float  # true end of the whole utterance
    pause: tuple[float, float] | None  # (start, end) of the mid-sentence pause


def _trim(pcm: np.ndarray) -> np.ndarray:
    return pcm[: int(speech_end(pcm) * RATE)]


def build_clips(voices: tuple[str, ...]) -> list[Clip]:
    silence = lambda s: np.zeros(int(s * RATE), np.float32)  # noqa: E731
    clips = []
    for v in voices:
        if not available(v):
            print(f"skipping {v}: not installed", file=sys.stderr)
            continue
        for text in COMPLETE:
            speech = _trim(synthesize(text, v))
            pcm = np.concatenate([silence(LEAD_S), speech, silence(TAIL_S)])
            clips.append(Clip(v, text, pcm, LEAD_S + speech.size / RATE, None))
        for i, (a, b) in enumerate(PAUSED):
            pause = PAUSES_S[i % len(PAUSES_S)]
            # the first half ends with a comma: spoken with the rising or level pitch of a
            # sentence that goes on (without it the TTS gives it a sentence's final fall)
            first, second = _trim(synthesize(a + ",", v)), _trim(synthesize(b, v))
            t0 = LEAD_S + first.size / RATE
            pcm = np.concatenate([silence(LEAD_S), first, silence(pause), second, silence(TAIL_S)])
            clips.append(
                Clip(v, f"{a} … {b}", pcm, t0 + pause + second.size / RATE, (t0, t0 + pause))
            )
    return clips


class _Collect(Stage):
    def __init__(self) -> None:
        super().__init__()
        # (frame, model time it waited on, the model's P(complete) that decided it)
        self.stops: list[tuple[SpeechStopped, float, float | None]] = []
        self.model_s = 0.0
        self.p: float | None = None

    async def process(self, frame: Frame) -> None:
        if isinstance(frame, SpeechStopped) and not frame.noise:
            self.stops.append((frame, self.model_s, self.p))


async def run_clip(clip: Clip, cfg: AgentConfig) -> dict:
    ctx = SessionContext(
        SessionOptions(vad=dataclasses.replace(cfg.vad)), cfg, False, Tasks("bench", print)
    )
    det = TurnDetector(ctx)
    sink = _Collect()
    det.next = sink
    if det.classifier is not None:
        classify = det.classifier.complete

        async def timed(pcm: np.ndarray) -> bool | None:
            t0 = time.perf_counter()
            verdict = await classify(pcm)
            sink.model_s = time.perf_counter() - t0
            sink.p = det.classifier.last_probability if det.classifier else None
            return verdict

        det.classifier.complete = timed  # type: ignore[method-assign]
    chunk = RATE // 50
    for i in range(0, clip.pcm.size, chunk):
        sink.model_s = 0.0
        sink.p = None
        await det.process(InputAudio(clip.pcm[i : i + chunk], i / RATE, time.monotonic()))
    if not sink.stops:
        return {"cut_off": False, "delay_s": None}
    first, model_s, p = sink.stops[0]
    cut = clip.pause is not None and first.t_decided < clip.pause[1] + 0.05
    delay = first.t_decided - clip.speech_end_s + model_s
    return {"cut_off": cut, "delay_s": None if cut else delay, "model_s": model_s, "p": p}


def summarise(rows: list[dict], clips: list[Clip]) -> dict:
    delays = [r["delay_s"] for r in rows if r["delay_s"] is not None]
    paused = [r for r, c in zip(rows, clips, strict=True) if c.pause is not None]
    complete = [r for r, c in zip(rows, clips, strict=True) if c.pause is None]

    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)), 3) if xs else None

    model = [r["model_s"] for r in rows if r.get("model_s")]
    return {
        "clips": len(rows),
        "endpoint_p50_s": pct(delays, 50),
        "endpoint_p95_s": pct(delays, 95),
        "endpoint_p50_complete_s": pct(
            [r["delay_s"] for r in complete if r["delay_s"] is not None], 50
        ),
        "endpoint_p95_complete_s": pct(
            [r["delay_s"] for r in complete if r["delay_s"] is not None], 95
        ),
        "complete_waited_over_1s": sum((r["delay_s"] or 0) > 1.0 for r in complete),
        "complete_clips": len(complete),
        "false_cutoffs": sum(r["cut_off"] for r in paused),
        "paused_clips": len(paused),
        "false_cutoff_rate": round(sum(r["cut_off"] for r in paused) / max(1, len(paused)), 3),
        "no_endpoint": sum(r["delay_s"] is None and not r["cut_off"] for r in rows),
        "model_ms_p50": round(1000 * statistics.median(model), 1) if model else None,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voices", choices=("tune", "report"), default="report")
    ap.add_argument("--threshold", type=float, default=EndOfTurnConfig().threshold)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    voices = TUNE_VOICES if args.voices == "tune" else REPORT_VOICES
    clips = build_clips(voices)
    await endpoint.ready()
    base = AgentConfig()
    eot = dataclasses.replace(base.vad.end_of_turn, threshold=args.threshold)
    modes = {
        "silence 400 ms": dataclasses.replace(
            base.vad, end_of_turn=dataclasses.replace(eot, mode="silence")
        ),
        "silence 1000 ms": dataclasses.replace(
            base.vad,
            silence_duration_ms=1000,
            end_of_turn=dataclasses.replace(eot, mode="silence"),
        ),
        f"semantic (p>={args.threshold:g})": dataclasses.replace(
            base.vad, end_of_turn=dataclasses.replace(eot, mode="semantic")
        ),
    }
    results = {}
    for name, vad in modes.items():
        cfg = dataclasses.replace(base, vad=vad)
        rows = [await run_clip(c, cfg) for c in clips]
        results[name] = {"summary": summarise(rows, clips), "vad": dataclasses.asdict(vad)}
        for r, c in zip(rows, clips, strict=True):
            r.update(voice=c.voice, text=c.text)
        results[name]["clips"] = rows
    print(f"{len(clips)} clips, voices: {', '.join(voices)}")
    print(
        f"{'mode':24} {'p50 s':>7} {'p95 s':>7} {'complete p50/p95 s':>19} "
        f"{'complete >1 s':>13} {'false cut-offs':>14} {'model ms':>9}"
    )
    for name, r in results.items():
        s = r["summary"]
        both = f"{s['endpoint_p50_complete_s']}/{s['endpoint_p95_complete_s']}"
        slow = f"{s['complete_waited_over_1s']}/{s['complete_clips']}"
        cuts = f"{s['false_cutoffs']}/{s['paused_clips']}"
        print(
            f"{name:24} {s['endpoint_p50_s']!s:>7} {s['endpoint_p95_s']!s:>7} {both:>19} "
            f"{slow:>13} {cuts:>14} {s['model_ms_p50']!s:>9}"
        )
    if args.out:
        write_result(
            args.out,
            {
                "voices": list(voices),
                "tuning_voices": list(TUNE_VOICES),
                "modes": results,
            },
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
