"""Barge-in on phone calls: over /twilio, does a backchannel spoken over an answer cut nothing,
and does a real interruption clear Twilio's buffer at once?

    python bench/twilio_barge_bench.py [--voices tune|report] [--lead-ms 300]
                                       [--out bench/results/twilio-barge-cpu.json]

A real server (``/twilio``) around real sessions: WebRTC VAD endpointer, the listener with
Whisper tiny.en, the turn controller, espeak-ng TTS; the engine is interrupt_bench's stand-in
that talks on and on. The caller is Twilio's side in real time (bench/twilio_caller.py): it
streams 8 kHz mu-law, plays the agent's media from a play-out buffer in real time, echoes the
marks as their audio plays, and empties the buffer on ``clear``. Each call: a question, then,
1 s into the answer, one of interrupt_bench's events (a backchannel or a real interruption in
an espeak-ng / flite voice, or a cough), then 2 s of silence; then the caller hangs up.

Counted, all as the caller sees them: ``clear`` on a backchannel or a cough (a false cut: the
buffered audio lost), missed interruptions (no ``clear``), for real ones the time from the
onset of the caller's speech to the ``clear`` and from the turn controller's decision to the
``clear`` arriving, the agent audio the ``clear`` dropped, media of the interrupted answer
after the ``clear``, and whether the history keeps exactly the words before the last mark
played; over every call, how far the media ran ahead of real time (at most the lead).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.interrupt_bench import (  # noqa: E402
    REPORT_VOICES,
    TUNE_VOICES,
    Event,
    Talker,
    TalkerSession,
    build_events,
)
from bench.record import write_result  # noqa: E402
from bench.twilio_caller import ahead_s, call, spy  # noqa: E402
from bench.voices import synthesize  # noqa: E402
from realtime.asr import WhisperRecognizer  # noqa: E402
from realtime.config import AgentConfig, SamplingConfig, ServerConfig, TTSConfig  # noqa: E402
from realtime.engine.worker import EngineWorker  # noqa: E402
from realtime.frames import SpeechStarted, Transcript  # noqa: E402
from realtime.runtime import Runtime  # noqa: E402
from realtime.server.app import create_app, make_runner  # noqa: E402
from tts import load_tts  # noqa: E402

QUESTION = ("When are you open?", "espeak:en-us@165")
INTO_ANSWER_S, TAIL_S = 1.0, 2.0


class PhoneTalkerSession(TalkerSession):
    def revise(self, turn: int, answer: str | None, forget_user: bool, forget_answer: bool) -> None:
        pass  # the truncation of an interrupted answer (it keeps no history)


class PhoneTalker(Talker):
    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> PhoneTalkerSession:
        return PhoneTalkerSession()


def to_phone(pcm16k: np.ndarray) -> np.ndarray:
    """16 kHz float32 -> 8 kHz int16, as a phone line carries it."""
    x = soxr.resample(pcm16k, 16000, 8000)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


async def the_session(rt: Runtime, before: set[Any]) -> Any:
    async with asyncio.timeout(10):
        while not (rt.sessions - before):
            await asyncio.sleep(0.01)
    return next(iter(rt.sessions - before))


async def trial(url: str, rt: Runtime, question: np.ndarray, event: Event) -> dict[str, Any]:
    before = set(rt.sessions)
    async with call(url) as tw:
        session = await the_session(rt, before)
        seen = spy(session)
        await tw.say(question)
        await tw.wait_for(lambda: tw.events("media"), 60)
        await asyncio.sleep(INTO_ANSWER_S)
        onset = time.monotonic()
        said_at = await tw.say(to_phone(event.pcm))
        await asyncio.sleep(TAIL_S)
    async with asyncio.timeout(20):
        while session in rt.sessions:
            await asyncio.sleep(0.05)
    clears = tw.events("clear")
    media = tw.events("media")
    row: dict[str, Any] = {
        "kind": event.kind,
        "label": event.label,
        "heard": any(isinstance(f, SpeechStarted) and t >= onset for t, f in seen),
        "clears": len(clears),
        "cleared_ms": round(1000 * tw.cleared_s),
        "max_ahead_ms": round(1000 * max(ahead_s(media))) if media else None,
    }
    decided = next((t for t, f in seen if f == "interrupt"), None)
    row["interrupted"] = decided is not None  # the turn controller's judgement
    row["transcripts"] = [
        f.text for t, f in seen if isinstance(f, Transcript) and f.final and t >= onset
    ]
    if clears:
        t_clear = clears[0].t
        row["onset_to_clear_s"] = round(t_clear - onset, 3)
        if decided is not None:
            row["decision_to_clear_ms"] = round(1000 * (t_clear - decided), 1)
        # a new answer (to the interrupting words) cannot start before they end
        row["media_after_clear"] = sum(1 for r in media if t_clear < r.t <= said_at + 0.4)
        played = [n for t, n in tw.echoed if t < t_clear and not n.endswith("-end")]
        rid = int(played[-1].split(":")[0]) if played else None
        entry = next(
            (e for e in session.history if e.response is not None and e.response.id == rid),
            None,
        )
        if entry is not None and entry.response is not None:
            ms = int(played[-1].split(":")[1])
            words = [p.text.strip() for p in entry.response.pieces if p.offset_s * 1000 < ms]
            row["truncated_at_last_played_mark"] = entry.spoken == " ".join(words)
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def of(kind: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["kind"] == kind]

    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)), 3) if xs else None

    real = [r for r in of("interruption") if r["clears"]]
    onset = [r["onset_to_clear_s"] for r in real]
    decision = [r["decision_to_clear_ms"] for r in real if "decision_to_clear_ms" in r]
    truncated = [
        r["truncated_at_last_played_mark"] for r in real if "truncated_at_last_played_mark" in r
    ]
    aheads = [r["max_ahead_ms"] for r in rows if r["max_ahead_ms"] is not None]
    return {
        "clears_on_backchannels": f"{sum(r['clears'] > 0 for r in of('backchannel'))}/{len(of('backchannel'))}",
        "clears_on_coughs": f"{sum(r['clears'] > 0 for r in of('cough'))}/{len(of('cough'))}",
        # what the pacing guarantees: no clear unless the controller judged an interruption
        "clears_without_interruption": sum(r["clears"] > 0 and not r["interrupted"] for r in rows),
        "audio_lost_to_backchannels_ms": sum(
            r["cleared_ms"] for r in of("backchannel") + of("cough")
        ),
        "missed_interruptions": f"{len(of('interruption')) - len(real)}/{len(of('interruption'))}",
        "onset_to_clear_p50_s": pct(onset, 50),
        "onset_to_clear_p95_s": pct(onset, 95),
        "decision_to_clear_p50_ms": pct(decision, 50),
        "decision_to_clear_max_ms": round(max(decision), 1) if decision else None,
        "cleared_at_twilio_max_ms": max((r["cleared_ms"] for r in real), default=None),
        "media_after_clear": sum(r.get("media_after_clear", 0) for r in rows),
        "truncated_at_last_played_mark": f"{sum(truncated)}/{len(truncated)}",
        "max_ahead_ms": max(aheads) if aheads else None,
        "speech_heard": f"{sum(r['heard'] for r in rows)}/{len(rows)}",
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voices", choices=("tune", "report"), default="report")
    ap.add_argument("--lead-ms", type=int, default=None, help="telephony.playout_lead_ms")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    voices = TUNE_VOICES if args.voices == "tune" else REPORT_VOICES
    events = build_events(voices)
    cfg = AgentConfig()
    if args.lead_ms is not None:
        cfg.telephony = dataclasses.replace(cfg.telephony, playout_lead_ms=args.lead_ms)
    tts = load_tts(TTSConfig(backend="espeak", voice="en-us"))
    rt = Runtime(cfg, WhisperRecognizer(cfg.asr), PhoneTalker(), EngineWorker(), tts, {})  # type: ignore[arg-type]
    runner = make_runner(create_app(rt, ServerConfig()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"ws://127.0.0.1:{runner.addresses[0][1]}"
    question = to_phone(synthesize(*QUESTION))
    rows = []
    try:
        for e in events:
            rows.append(await trial(url, rt, question, e))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        await runner.cleanup()
        await rt.close()
    summary = summarise(rows)
    print(
        f"\n{len(events)} calls; voices: {', '.join(voices)}; lead {cfg.telephony.playout_lead_ms} ms"
    )
    for k, v in summary.items():
        print(f"{k:32} {v}")
    if args.out:
        write_result(
            args.out,
            {
                "voices": list(voices),
                "telephony": dataclasses.asdict(cfg.telephony),
                "barge_in": dataclasses.asdict(cfg.barge_in),
                "summary": summary,
                "calls": rows,
            },
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
