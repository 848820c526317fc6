"""Soak: many simulated callers against the real server on loopback, for a bounded time, then a
check that nothing leaked.

The server runs in this process on the real offline runtime (``configs/embedded.yaml``), so
the check can look inside it. Each caller speaks questions (espeak-ng / flite voices, see
``bench/voices.py``) in real time with pauses, over ``/v1/realtime``, ``/twilio`` or WebRTC
(``/offer``); some answers it interrupts by speaking again (barge-in), some calls it drops
mid-answer and dials again. Afterwards:

- no asyncio task, thread, session, WebRTC peer connection or engine session (the engine's
  cache) is left beyond what the server held before the first call;
- the process's RSS grew by less than ``--rss-bound-mb`` from the end of the warm-up (the
  first quarter of the run) to the end.

    python bench/soak.py                       # 16 callers, 5 minutes (make soak)
    python bench/soak.py --callers 4 --duration 20

Prints a table and writes ``bench/results/soak-cpu.json``."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.voices import DEFAULT_VOICES, QUESTIONS, available, speech_end, synthesize  # noqa: E402,I001
from realtime.config import ServerConfig, load_config  # noqa: E402
from realtime.server.app import create_app  # noqa: E402
from realtime.server.codecs import ulaw_encode  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "soak-cpu.json"
CHUNK_S = 0.1  # callers stream their microphone in 100 ms messages
ANSWER_TIMEOUT_S = 120.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Clip:
    text: str
    pcm: np.ndarray  # float32, 16 kHz
    end_s: float  # true end of speech in the clip

    def at(self, rate: int) -> np.ndarray:
        x = self.pcm if rate == 16000 else soxr.resample(self.pcm, 16000, rate)
        return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def make_clips(n: int = 6) -> list[Clip]:
    voices = [v for v in DEFAULT_VOICES if available(v)]
    if not voices:
        raise SystemExit("the soak needs espeak-ng or flite (make system-deps)")
    clips = []
    for i, text in enumerate(QUESTIONS[:n]):
        pcm = synthesize(text, voices[i % len(voices)])
        clips.append(Clip(text, pcm, speech_end(pcm)))
    return clips


@dataclass
class Stats:
    transport: str
    connects: int = 0
    questions: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    barge_ins: int = 0
    disconnects: int = 0
    no_answer: int = 0  # a question the caller waited for in vain (timeout)
    transport_errors: list[str] = field(default_factory=list)
    error_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    first_audio_s: list[float] = field(default_factory=list)  # end of speech -> first audio


class Mic:
    """What a caller says, streamed in real time in ``CHUNK_S`` pieces; silence in between."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.pending = np.zeros(0, np.int16)

    def say(self, pcm: np.ndarray, end_s: float) -> float:
        """Queue ``pcm``; returns the wall time its speech will have ended."""
        ahead = len(self.pending) / self.rate
        self.pending = np.concatenate([self.pending, pcm])
        return time.monotonic() + ahead + end_s

    def next_chunk(self) -> np.ndarray:
        n = int(self.rate * CHUNK_S)
        chunk, self.pending = self.pending[:n], self.pending[n:]
        return np.concatenate([chunk, np.zeros(n - len(chunk), np.int16)])

    async def run(self, send: Any) -> None:
        t = time.monotonic()
        while True:
            await send(self.next_chunk())
            t += CHUNK_S
            await asyncio.sleep(max(0.0, t - time.monotonic()))


@dataclass
class Plan:
    """What a caller does with the answer to one question."""

    barge_in: bool
    hang_up: bool
    pause_s: float


def plan(rng: random.Random, p_barge: float, p_hang_up: float) -> Plan:
    x = rng.random()
    return Plan(x < p_barge, p_barge <= x < p_barge + p_hang_up, rng.uniform(0.5, 3.0))


@dataclass
class Answers:
    """One caller's side of the conversation, whatever the transport: it asks (``converse``),
    and its transport's reader reports each answer's first audio (``audio``) and its end
    (``ended``)."""

    stats: Stats
    done: asyncio.Queue[str] = field(default_factory=asyncio.Queue)  # how each answer ended
    audio_started: asyncio.Event = field(default_factory=asyncio.Event)
    spoke_at: float = 0.0  # when the last question's speech ends (0 once its answer is heard)

    def audio(self) -> None:
        """Answer audio arrived: the first of an answer times it from the end of speech."""
        if self.audio_started.is_set():
            return
        self.audio_started.set()
        if self.spoke_at:
            self.stats.first_audio_s.append(time.monotonic() - self.spoke_at)
            self.spoke_at = 0.0

    def ended(self, status: str) -> None:
        self.audio_started.clear()
        self.done.put_nowait(status)

    async def converse(
        self,
        say: Callable[[Clip], float],
        clips: list[Clip],
        deadline: float,
        rng: random.Random,
        p_barge: float,
        p_hang_up: float,
    ) -> bool:
        """Questions until ``deadline``, each answered, barged in on or hung up on as
        :func:`plan` draws; ``say`` speaks a clip and returns when its speech ends. True if
        the caller hung up (the connection closes under whatever is in flight)."""
        while time.monotonic() < deadline:
            clip, p = rng.choice(clips), plan(rng, p_barge, p_hang_up)
            _drain(self.done)
            self.spoke_at = say(clip)
            self.stats.questions += 1
            if p.hang_up:
                await asyncio.sleep(clip.end_s + rng.uniform(0.5, 4.0))
                self.stats.disconnects += 1
                return True
            if p.barge_in:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.audio_started.wait(), _left(deadline))
                    await asyncio.sleep(rng.uniform(0.1, 1.0))
                    self.spoke_at = say(rng.choice(clips))
                    self.stats.barge_ins += 1
                    self.stats.questions += 1
            await _collect(self.done, self.stats, deadline)
            await asyncio.sleep(p.pause_s)
        return False


# ---- /v1/realtime --------------------------------------------------------------------------
async def realtime_call(
    url: str,
    clips: list[Clip],
    deadline: float,
    rng: random.Random,
    stats: Stats,
    p_barge: float,
    p_hang_up: float,
) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        stats.connects += 1
        mic = Mic(24000)
        answers = Answers(stats)

        async def send(pcm: np.ndarray) -> None:
            audio = base64.b64encode(pcm.tobytes()).decode()
            await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))

        async def read() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                kind = event["type"]
                if kind == "response.output_audio.delta":
                    answers.audio()
                elif kind == "response.done":
                    answers.ended(event["response"]["status"])
                elif kind == "error":
                    stats.error_codes[event["error"]["code"]] += 1

        first = json.loads((await ws.receive(timeout=60)).data)
        assert first["type"] == "session.created", first
        tasks = [asyncio.ensure_future(mic.run(send)), asyncio.ensure_future(read())]
        try:
            await answers.converse(
                lambda clip: mic.say(clip.at(24000), clip.end_s),
                clips, deadline, rng, p_barge, p_hang_up,
            )  # fmt: skip
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _drain(done: asyncio.Queue[str]) -> None:
    """Forget answers that ended unasked for (a question heard as two turns)."""
    while not done.empty():
        done.get_nowait()


def _left(deadline: float) -> float:
    """How long to wait for an answer: at most until the end of the soak."""
    return max(0.05, min(ANSWER_TIMEOUT_S, deadline - time.monotonic()))


async def _collect(done: asyncio.Queue[str], stats: Stats, deadline: float) -> None:
    """Wait for the answer to end (completed or failed). Answers cancelled on the way (the one
    barged in on; a speculative one dropped when the question went on after a pause) are
    counted, and the wait goes on; an answer still going when the soak ends is not counted."""
    while True:
        try:
            status = await asyncio.wait_for(done.get(), _left(deadline))
        except TimeoutError:
            if time.monotonic() < deadline:
                stats.no_answer += 1
            return
        if status == "cancelled":
            stats.cancelled += 1
            continue
        if status == "completed":
            stats.completed += 1
        else:
            stats.failed += 1
        return


# ---- /twilio -------------------------------------------------------------------------------
async def twilio_call(
    url: str,
    clips: list[Clip],
    deadline: float,
    rng: random.Random,
    stats: Stats,
    p_barge: float,
    p_hang_up: float,
) -> None:
    sid = f"MZsoak{rng.randrange(10**9)}"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        stats.connects += 1
        mic = Mic(8000)
        answers = Answers(stats)
        fmt = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        await ws.send_str(json.dumps({"event": "connected", "protocol": "Call"}))
        await ws.send_str(
            json.dumps(
                {
                    "event": "start",
                    "streamSid": sid,
                    "start": {"streamSid": sid, "mediaFormat": fmt},
                }
            )
        )

        async def send(pcm: np.ndarray) -> None:
            payload = base64.b64encode(ulaw_encode(pcm)).decode()
            await ws.send_str(
                json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}})
            )

        async def read() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                kind = event["event"]
                if kind == "media":
                    answers.audio()
                elif kind == "mark":  # played at once: echo it, as Twilio does
                    await ws.send_str(
                        json.dumps({"event": "mark", "streamSid": sid, "mark": event["mark"]})
                    )
                    if event["mark"]["name"].endswith("-end"):
                        answers.ended("completed")
                elif kind == "clear":
                    answers.ended("cancelled")
                elif kind == "error":
                    stats.error_codes[event["error"]["code"]] += 1

        tasks = [asyncio.ensure_future(mic.run(send)), asyncio.ensure_future(read())]
        try:
            hung_up = await answers.converse(
                lambda clip: mic.say(clip.at(8000), clip.end_s),
                clips, deadline, rng, p_barge, p_hang_up,
            )  # fmt: skip
            if not hung_up:
                await ws.send_str(json.dumps({"event": "stop", "streamSid": sid}))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# ---- WebRTC --------------------------------------------------------------------------------
async def webrtc_call(
    base: str,
    clips: list[Clip],
    deadline: float,
    rng: random.Random,
    stats: Stats,
    p_barge: float,
    p_hang_up: float,
) -> None:
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from realtime.server.webrtc import SessionAudioTrack

    pc = RTCPeerConnection()
    channel = pc.createDataChannel("events")
    mic = SessionAudioTrack()  # plays what it is fed, silence otherwise, in real time
    pc.addTrack(mic)
    answers = Answers(stats)
    readers: list[asyncio.Task[None]] = []

    @channel.on("message")
    def on_message(message: str) -> None:
        event = json.loads(message)
        kind = event["event"]
        if kind == "answer":
            answers.audio()
        elif kind == "turn":
            answers.ended("cancelled" if event.get("interrupted") else "completed")
        elif kind == "error":
            stats.error_codes[event.get("code", "?")] += 1

    async def drain(track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    @pc.on("track")
    def on_track(track: Any) -> None:
        readers.append(asyncio.ensure_future(drain(track)))

    def say(clip: Clip) -> float:
        ahead = mic.buffered_s
        mic.feed(clip.at(48000))
        return time.monotonic() + ahead + clip.end_s

    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
            async with http.post(f"{base}/offer", json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"/offer: {r.status} {await r.text()}")
                await pc.setRemoteDescription(RTCSessionDescription(**await r.json()))
        stats.connects += 1
        await answers.converse(say, clips, deadline, rng, p_barge, p_hang_up)
    finally:
        for t in readers:
            t.cancel()
        await pc.close()


CALLS = {"realtime": realtime_call, "twilio": twilio_call, "webrtc": webrtc_call}


async def caller(
    transport: str,
    base: str,
    clips: list[Clip],
    deadline: float,
    rng: random.Random,
    stats: Stats,
    p_barge: float,
    p_hang_up: float,
) -> None:
    """Call, and call again after each hang-up, until the deadline."""
    ws = base.replace("http://", "ws://")
    target = {"realtime": f"{ws}/v1/realtime", "twilio": f"{ws}/twilio", "webrtc": base}[transport]
    await asyncio.sleep(rng.uniform(0, 3))  # callers do not all dial at once
    while time.monotonic() < deadline:
        try:
            await CALLS[transport](target, clips, deadline, rng, stats, p_barge, p_hang_up)
        except (aiohttp.ClientError, RuntimeError, AssertionError, TimeoutError) as exc:
            stats.transport_errors.append(f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(1.0)
        await asyncio.sleep(rng.uniform(0.2, 2.0))


# ---- what the server holds -----------------------------------------------------------------
def holdings(runtime: Any, ctx: Any) -> dict[str, int]:
    """Counts of everything a call may hold, server side and client side (same process)."""
    from aiortc import RTCPeerConnection

    from realtime.session import Session

    gc.collect()
    with warnings.catch_warnings():  # isinstance() wakes torch's deprecated lazy attributes
        warnings.simplefilter("ignore")
        return _count(runtime, ctx, Session, RTCPeerConnection)


def _count(runtime: Any, ctx: Any, session_type: type, pc_type: type) -> dict[str, int]:
    engine_session_type = type(runtime.engine).__module__
    objects = gc.get_objects()
    return {
        "tasks": len(asyncio.all_tasks()),
        # idle workers of asyncio's default executor (grown on demand) are a pool, not a leak
        "threads": sum(not t.name.startswith("asyncio_") for t in threading.enumerate()),
        "sessions_open": ctx.active,
        "runtime_sessions": len(runtime.sessions),
        "session_objects": sum(isinstance(o, session_type) for o in objects),
        "engine_sessions": sum(
            type(o).__module__ == engine_session_type and type(o).__name__.endswith("Session")
            for o in objects
        ),
        "peer_connections": sum(isinstance(o, pc_type) for o in objects),
        "live_sessions": len(ctx.live),
    }


async def settle(
    runtime: Any, ctx: Any, before: dict[str, int], timeout_s: float
) -> tuple[dict[str, int], float]:
    """Wait until what is held is back to ``before`` (or the timeout); returns the last count
    and how long it took. The sessions' closes queue behind the engine's work in flight."""
    t0 = time.monotonic()
    while True:
        quick = ctx.active or runtime.sessions or ctx.live
        if not quick or time.monotonic() - t0 > timeout_s:
            now = holdings(runtime, ctx)
            if all(now[k] <= before[k] for k in before) or time.monotonic() - t0 > timeout_s:
                return now, time.monotonic() - t0
        await asyncio.sleep(0.5)


async def run_soak(
    runtime: Any,
    callers: int = 16,
    duration_s: float = 300.0,
    seed: int = 0,
    mix: dict[str, float] | None = None,
    p_barge: float = 0.25,
    p_hang_up: float = 0.15,
    settle_s: float = 60.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Soak ``runtime`` behind an in-process server; returns the figures (see the module)."""
    from aiohttp import web

    from realtime.server.app import CTX_KEY

    mix = mix or {"realtime": 0.75, "twilio": 0.125, "webrtc": 0.125}
    clips = await asyncio.get_running_loop().run_in_executor(None, make_clips)
    app = create_app(runtime, ServerConfig(max_sessions=max(16, callers + 4)))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    ctx = app[CTX_KEY]
    kinds = _assign(callers, mix)
    try:
        before = holdings(runtime, ctx)
        rss: list[tuple[float, float]] = [(0.0, rss_mb())]
        t0 = time.monotonic()
        deadline = t0 + duration_s
        rng = random.Random(seed)
        stats = [Stats(k) for k in kinds]
        tasks = [
            asyncio.ensure_future(
                caller(k, base, clips, deadline, random.Random(rng.random()), s, p_barge, p_hang_up)
            )
            for k, s in zip(kinds, stats, strict=True)
        ]
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=5.0)
            rss.append((time.monotonic() - t0, rss_mb()))
            if progress and len(rss) % 6 == 0:
                t = _totals(stats)
                print(
                    f"{rss[-1][0]:6.0f} s: {ctx.active} sessions, {t['questions']} questions, "
                    f"{t['completed']} completed, {t['cancelled']} cancelled, "
                    f"{t['disconnects']} hang-ups, errors {t['error_codes']}, "
                    f"RSS {rss[-1][1]:.0f} MB",
                    flush=True,
                )
        for t in tasks:
            if t.exception() is not None:
                raise t.exception()  # a bug in the soak itself
        wall_s = time.monotonic() - t0
        after, settled_s = await settle(runtime, ctx, before, settle_s)
        left_over = {  # what still runs, by name, to tell a leak from a slow close
            "tasks": sorted(
                str(t.get_coro().__qualname__)  # type: ignore[union-attr]
                for t in asyncio.all_tasks()
                if t is not asyncio.current_task()
            ),
            "threads": sorted(t.name for t in threading.enumerate()),
        }
        rss.append((time.monotonic() - t0, rss_mb()))
    finally:
        await runner.cleanup()
    warm = next(m for t, m in rss if t >= duration_s / 4)
    leaks = {k: after[k] - before[k] for k in before if after[k] > before[k]}
    return {
        "callers": callers,
        "transports": dict(collections.Counter(kinds)),
        "duration_s": duration_s,
        "wall_s": round(wall_s, 1),
        "seed": seed,
        "p_barge_in": p_barge,
        "p_hang_up": p_hang_up,
        "totals": _totals(stats),
        "by_transport": {k: _totals([s for s in stats if s.transport == k]) for k in set(kinds)},
        "held_before": before,
        "held_after": after,
        "settled_in_s": round(settled_s, 1),
        "left_over": left_over,
        "leaks": leaks,
        "rss_mb": {
            "start": round(rss[0][1], 1),
            "warm": round(warm, 1),
            "peak": round(max(m for _, m in rss), 1),
            "end": round(rss[-1][1], 1),
            "growth_after_warmup": round(rss[-1][1] - warm, 1),
            "series": [(round(t, 1), round(m, 1)) for t, m in rss],
        },
    }


def _assign(callers: int, mix: dict[str, float]) -> list[str]:
    kinds: list[str] = []
    for k, share in mix.items():
        kinds += [k] * max(1 if share > 0 else 0, round(callers * share))
    while len(kinds) > callers:
        kinds.remove(max(set(kinds), key=kinds.count))
    while len(kinds) < callers:
        kinds.append("realtime")
    return kinds


def _totals(stats: list[Stats]) -> dict[str, Any]:
    lat = sorted(x for s in stats for x in s.first_audio_s)
    codes: collections.Counter[str] = collections.Counter()
    for s in stats:
        codes.update(s.error_codes)
    out: dict[str, Any] = {
        k: sum(getattr(s, k) for s in stats)
        for k in (
            "connects",
            "questions",
            "completed",
            "cancelled",
            "failed",
            "barge_ins",
            "disconnects",
            "no_answer",
        )
    }
    out["transport_errors"] = [e for s in stats for e in s.transport_errors]
    out["error_codes"] = dict(codes)
    out["first_audio_s"] = {
        "n": len(lat),
        "p50": round(float(np.percentile(lat, 50)), 2) if lat else None,
        "p90": round(float(np.percentile(lat, 90)), 2) if lat else None,
    }
    return out


def table(result: dict[str, Any]) -> str:
    rows = [
        (
            "transport",
            "callers",
            "calls",
            "questions",
            "completed",
            "cancelled",
            "failed",
            "barge-ins",
            "hang-ups",
            "no answer",
            "1st audio p50/p90 s",
        )
    ]
    for k, t in sorted(result["by_transport"].items()) + [("all", result["totals"])]:
        n = result["transports"].get(k, result["callers"])
        fa = t["first_audio_s"]
        rows.append(
            (
                k,
                n,
                t["connects"],
                t["questions"],
                t["completed"],
                t["cancelled"],
                t["failed"],
                t["barge_ins"],
                t["disconnects"],
                t["no_answer"],
                f"{fa['p50']}/{fa['p90']}",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    m = result["rss_mb"]
    lines.append(
        f"held before {result['held_before']}\n"
        f"held after  {result['held_after']} (settled in {result['settled_in_s']} s)\n"
        f"leaks: {result['leaks'] or 'none'}\n"
        f"RSS MB: start {m['start']}, after warm-up {m['warm']}, peak {m['peak']}, end {m['end']}"
        f" (growth after warm-up {m['growth_after_warmup']})"
    )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from realtime.runtime import Runtime

    runtime = await Runtime.create(load_config(args.config))
    try:
        return await run_soak(
            runtime,
            args.callers,
            args.duration,
            args.seed,
            p_barge=args.barge_in,
            p_hang_up=args.hang_up,
            progress=True,
            settle_s=args.settle,
        )
    finally:
        await runtime.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of calling")
    p.add_argument("--config", default="embedded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--barge-in", type=float, default=0.25, help="share of answers interrupted")
    p.add_argument("--hang-up", type=float, default=0.15, help="share of calls dropped mid-answer")
    p.add_argument("--rss-bound-mb", type=float, default=200.0)
    p.add_argument(
        "--settle", type=float, default=120.0, help="seconds to wait for the closes to finish"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(_main(args))
    result.update(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.1f}",
        config=args.config,
        rss_bound_mb=args.rss_bound_mb,
        command=" ".join(["python", "bench/soak.py", *sys.argv[1:]]),
    )
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=asdict) + "\n")
    print(f"wrote {args.out}")
    ok = not result["leaks"] and result["rss_mb"]["growth_after_warmup"] < args.rss_bound_mb
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
