"""What a user hears: first-packet latency through the whole pipeline, end to end.

One long conversation per think budget: questions in voices the project was never tuned on
(espeak-ng and flite, several speaking rates; see bench/voices.py), each followed by a silence
drawn between ``--gaps`` seconds (log-uniform), fed to one Session (VAD, listener, engine, TTS,
paced output) in 20 ms chunks at real-time pace. The history grows, and gets trimmed, as in a
real call; an answer still playing when the next question starts is barged in on.

Every time is taken by the client of the session: the first audio packet of the answer to a
question, minus the wall time at which the question's *true* end of speech was fed (from the
clip itself, not the pipeline's VAD). A turn whose answer sent no audio before the next
question began counts as a turn without audio.

    python bench/pipeline_bench.py                                   # CPU, offline default
    python bench/pipeline_bench.py --config step-audio-r1-random --budgets 0,64,512 \\
        --set tts.backend=espeak --out bench/results/pipeline-gpu.json   # GPU (device tool)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.voices import DEFAULT_VOICES, QUESTIONS, RATE, available, speech_end, synthesize  # noqa: E402,I001
from realtime.cli import feed_file  # noqa: E402
from realtime.config import load_config  # noqa: E402
from realtime.frames import AnswerText, EndFrame, Frame, OutputAudio, TurnMetrics  # noqa: E402
from realtime.runtime import Runtime  # noqa: E402

LEAD_S = 0.5


@dataclass
class Turn:
    voice: str
    question: str
    start_s: float  # stream time the clip starts
    end_s: float  # stream time of the true end of speech
    next_start_s: float  # when the next question starts (or the end of the conversation)


@dataclass
class Seen:
    """What the client received, with wall times."""

    audio: dict[int, float] = field(default_factory=dict)  # response id -> first packet
    text: dict[int, float] = field(default_factory=dict)  # response id -> first answer text
    metrics: dict[int, TurnMetrics] = field(default_factory=dict)  # by response id


def conversation(
    n: int, voices: list[str], gaps: tuple[float, float], seed: int
) -> tuple[np.ndarray, list[Turn]]:
    rng = random.Random(seed)
    pieces, turns, t = [np.zeros(int(LEAD_S * RATE), np.float32)], [], LEAD_S
    lo, hi = np.log(gaps[0]), np.log(gaps[1])
    for i in range(n):
        voice, question = voices[i % len(voices)], QUESTIONS[(i * 3) % len(QUESTIONS)]
        clip = synthesize(question, voice)
        gap = float(np.exp(rng.uniform(lo, hi)))
        turns.append(Turn(voice, question, t, t + speech_end(clip), 0.0))
        pieces += [clip, np.zeros(int(gap * RATE), np.float32)]
        t += (len(clip) + int(gap * RATE)) / RATE
    for a, b in zip(turns, [*turns[1:], None], strict=True):
        a.next_start_s = b.start_s if b is not None else t
    return np.concatenate(pieces), turns


async def converse(runtime: Runtime, pcm: np.ndarray, budget: int | None) -> tuple[float, Seen]:
    session = runtime.new_session(pace_output=True)
    if budget is not None:
        session.update(think_budget=budget)
    await session.start()
    seen = Seen()

    async def read() -> None:
        async for frame in session.frames():
            now = time.monotonic()
            if isinstance(frame, OutputAudio):
                seen.audio.setdefault(frame.response_id, now)
            elif isinstance(frame, AnswerText) and frame.text:
                seen.text.setdefault(frame.response_id, now)
            elif isinstance(frame, TurnMetrics) and frame.response_id is not None:
                seen.metrics[frame.response_id] = frame
            if isinstance(frame, EndFrame):
                return

    reader = asyncio.create_task(read())
    t0 = await feed_file(session, pcm, RATE, realtime=True, tail_s=0.0)  # 20 ms chunks, live
    await session.end()
    await asyncio.wait_for(reader, 120)
    await session.close()
    return t0, seen


def score(t0: float, turns: list[Turn], seen: Seen) -> list[dict[str, Any]]:
    """Match each question with the first answer heard after it began."""
    out = []
    firsts = sorted((t, rid) for rid, t in seen.audio.items())
    for k, turn in enumerate(turns):
        start, end, nxt = (t0 + s for s in (turn.start_s, turn.end_s, turn.next_start_s))
        heard = [(t, rid) for t, rid in firsts if start < t < nxt]
        row: dict[str, Any] = {"turn": k + 1, "voice": turn.voice, "question": turn.question}
        if not heard:
            out.append(row)
            continue
        t, rid = heard[0]
        row["first_packet_s"] = t - end
        if rid in seen.text:
            row["first_text_at_client_s"] = seen.text[rid] - end
        m = seen.metrics.get(rid)
        if m is not None:
            b = m.breakdown
            row.update(
                transcript=m.transcript,
                answer=m.answer[:200],
                interrupted=m.interrupted,
                first_token_s=b.get("first_token_s"),
                first_packet_vad_s=m.first_packet_s,
                endpoint_s=b.get("endpoint_s"),
                output_tokens=m.usage.get("output_tokens"),
            )
            span = (b.get("last_token_s") or 0) - (b.get("first_token_s") or 0)
            # answer tokens only: a reasoning lane decodes beside the speaking one
            tokens = (m.usage.get("output_tokens") or 0) - (m.usage.get("reasoning_tokens") or 0)
            row["answer_tokens"] = tokens
            if tokens > 1 and span > 0:
                row["tokens_per_s"] = (tokens - 1) / span
            audio_s = m.audio_s
            if tokens and audio_s > 1 and not m.interrupted:
                row["speech_tokens_per_s"] = tokens / audio_s  # the rate speaking needs
        out.append(row)
    return out


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(max(values)),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    fp = [r["first_packet_s"] for r in rows if "first_packet_s" in r]
    by_index = {r["turn"]: r.get("first_packet_s") for r in rows}
    early = [v for k, v in by_index.items() if 2 <= k <= 6 and v is not None]
    late = [v for k, v in by_index.items() if k >= 20 and v is not None]
    return {
        "first_packet_s": stats(fp),
        "first_token_s": stats([r["first_token_s"] for r in rows if r.get("first_token_s")]),
        "tokens_per_s": stats([r["tokens_per_s"] for r in rows if "tokens_per_s" in r]),
        "speech_tokens_per_s": stats(
            [r["speech_tokens_per_s"] for r in rows if "speech_tokens_per_s" in r]
        ),
        "turns": len(rows),
        "turns_without_audio": sum("first_packet_s" not in r for r in rows),
        "first_packet_p50_turns_2_6": float(np.median(early)) if early else None,
        "first_packet_p50_turns_20_on": float(np.median(late)) if late else None,
        "rows": rows,
    }


def late_captures(runtime: Runtime) -> int | None:
    """CUDA graphs captured after warm-up (each one a stall); None without a graphed runner."""
    runner = getattr(runtime.engine, "runner", None)
    return getattr(runner, "late_captures_total", None)


def card() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


async def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="embedded")
    ap.add_argument("--budgets", default="", help="think budgets, e.g. 0,64,512 (default: config)")
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--gaps", default="1,30", help="silence after each question, min,max s")
    ap.add_argument("--voices", default=",".join(DEFAULT_VOICES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/pipeline-cpu.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    config = load_config(args.config, overrides)
    voices = [v for v in args.voices.split(",") if available(v)]
    if not voices:
        sys.exit("no test voice is available: install espeak-ng and/or flite")
    gap_lo, gap_hi = (float(g) for g in args.gaps.split(","))
    budgets = [int(b) for b in args.budgets.split(",") if b] or [None]
    pcm, turns = conversation(args.turns, voices, (gap_lo, gap_hi), args.seed)
    print(f"{len(turns)} questions, {len(pcm) / RATE:.0f} s of audio per budget, voices: {voices}")

    t = time.monotonic()
    runtime = await Runtime.create(config)
    load_s = time.monotonic() - t

    results: dict[str, Any] = {}
    try:
        for budget in budgets:
            key = str(config.engine.sampling.think_budget if budget is None else budget)
            t0, seen = await converse(runtime, pcm, budget)
            results[key] = summarise(score(t0, turns, seen))
            print(f"budget {key}: done")
        captured = late_captures(runtime)
    finally:
        await runtime.close()

    print("\nFirst audio packet after the true end of speech (s), through the whole pipeline:")
    print(f"{'budget':>7} {'p50':>6} {'p95':>6} {'max':>6} {'token50':>7} {'tok/s':>6} "
          f"{'need':>6} {'turns':>5} {'silent':>6} {'t2-6':>6} {'t20+':>6}")  # fmt: skip
    for key, r in results.items():
        fp = r["first_packet_s"]
        print(
            f"{key:>7} {fmt(fp['p50'])} {fmt(fp['p95'])} {fmt(fp['max'])} "
            f"{fmt(r['first_token_s']['p50']):>7} {fmt(r['tokens_per_s']['p50'])} "
            f"{fmt(r['speech_tokens_per_s']['p50'])} {r['turns']:>5} "
            f"{r['turns_without_audio']:>6} {fmt(r['first_packet_p50_turns_2_6'])} "
            f"{fmt(r['first_packet_p50_turns_20_on'])}"
        )
    doc = {
        "benchmark": "pipeline (end to end: VAD, listener, engine, TTS, paced output)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "card": card(),
        "config": args.config,
        "overrides": overrides,
        "engine": config.engine.backend,
        "tts": config.tts.backend,
        "voices": voices,
        "gaps_s": [gap_lo, gap_hi],
        "audio_s_per_budget": len(pcm) / RATE,
        "load_s": load_s,
        "graphs_captured_after_warmup": captured,
        "forced_answer": config.engine.forced_answer or None,
        "budgets": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2, default=_json_default))
    print(f"wrote {args.out}")


def _json_default(o: object) -> object:
    if isinstance(o, Frame):
        return repr(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    asyncio.run(main())
