"""Load generator: N simulated callers talk at once to a running server's ``/v1/realtime``.

    python bench/load.py                          # starts the server (configs/embedded.yaml)
    python bench/load.py --n 1,4,16,32 --turns 3 --config embedded --out bench/results/load.json
    python bench/load.py --url ws://127.0.0.1:8080/v1/realtime --n 4   # a server already running

Each caller opens its own WebSocket and behaves like a phone caller: its microphone streams
20 ms chunks of 24 kHz PCM at real-time pace the whole call (``input_audio_buffer.append``,
silence between questions), it speaks a question (espeak-ng / flite voices from
``bench/voices.py``, never the project's tuning voice), waits for the answer to play out, pauses,
and asks the next. A share of the callers (``--barge-in``) cut in: they speak their next
question while the answer is still arriving. Turn detection is the server's own (server VAD).

Measured per turn, as the caller sees it:
- first packet: from the true end of the question's speech (the clip's last loud 10 ms, at the
  moment the microphone would have produced it) to the first ``response.output_audio.delta``
  of the turn's answer;
- answer tokens/s: the engine's text tokens of a completed answer (``response.done`` usage)
  over the answer's time from ``response.created`` to ``response.done`` (the median over
  answers): the rate the answer reached the caller, generation and synthesis together;
- errors (``error`` events, failed responses, turns with no answer) and rejections (the server
  refused the caller: ``session_limit_reached`` / ``server_busy`` errors, HTTP 503).

It targets loopback only (a load test must not hit someone else's server) and stops by itself
(``--turns`` per caller, ``--duration`` at most). The server is started as a subprocess
(``--config``, ``--set key=value`` overrides) unless ``--url`` is given. Prints a table per N and
writes JSON: ``{"machine": ..., "load": {"N": {"first_packet_s": {"p50", "p95", "p99"},
"answer_tokens_per_s", "rejected", "errors", "turns"}}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.device_model import MODELS  # noqa: E402
from bench.voices import DEFAULT_VOICES, QUESTIONS, available, speech_end, synthesize  # noqa: E402

RATE = 24000  # the Realtime API's default input format: audio/pcm at 24 kHz
CHUNK_S = 0.02
CHUNK = int(RATE * CHUNK_S)
# filler for --context-words (about 2.5 tokens a word in the step-audio-random tokenizer, whose
# merges are the forced answer's words with their punctuation)
FILLER = (
    "this is a fixed answer because the weights are random every step is still computed and "
    "timed for real ask me another question whenever you like"
).split()
REJECT_CODES = {"session_limit_reached", "server_busy", "server_full"}
ROOT = Path(__file__).resolve().parent.parent


# ---- loopback only ---------------------------------------------------------------------------
def check_loopback(url: str) -> str:
    """The URL's host, if every address it resolves to is a loopback one; else ValueError."""
    host = urlparse(url).hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    outside = sorted(a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside:
        raise ValueError(
            f"refusing to load {host!r} ({', '.join(outside)}): the load generator targets "
            "loopback only (127.0.0.0/8, ::1)"
        )
    return host


# ---- speech --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    text: str
    voice: str
    pcm: np.ndarray  # int16 at 24 kHz, the speech only
    end_s: float  # true end of speech from the clip's start


def make_clips(voices: list[str], questions: list[str]) -> list[Clip]:
    clips = []
    for i, q in enumerate(questions):
        voice = voices[i % len(voices)]
        x16 = synthesize(q, voice)
        end = speech_end(x16)
        x = soxr.resample(x16[: int(end * 16000) + 160], 16000, RATE)
        pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
        clips.append(Clip(q, voice, pcm, end))
    return clips


# ---- one caller ----------------------------------------------------------------------------
@dataclass
class Turn:
    question: str
    barge_in: bool
    t_end: float = 0.0  # wall time of the true end of speech
    first_packet_s: float | None = None
    response_id: str | None = None
    status: str | None = None  # response.done status of the answer
    tokens_per_s: float | None = None
    # playback at the caller: the answer's audio played from its first packet at real-time
    # pace; an underrun is a chunk that arrived after what came before it had finished playing
    play_end: float = 0.0
    audio_s: float = 0.0
    underruns: int = 0
    max_gap_s: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (answer audio before, gap)
    warm_up: bool = False  # a turn before the seeded context is pre-filled (--context-words)


@dataclass
class CallerResult:
    turns: list[Turn] = field(default_factory=list)
    rejected: bool = False
    errors: list[str] = field(default_factory=list)


class Caller:
    def __init__(
        self,
        idx: int,
        url: str,
        clips: list[Clip],
        turns: int,
        barge_in: bool,
        pause_s: tuple[float, float],
        answer_timeout_s: float,
        deadline: float,
        headers: dict[str, str],
        trace: bool = False,
        context_words: int = 0,
    ) -> None:
        self.idx = idx
        self.trace = trace
        self.url = url
        self.rng = random.Random(idx)
        self.clips = clips
        self.n_turns = turns
        self.barge_in = barge_in
        self.pause_s = pause_s
        self.answer_timeout_s = answer_timeout_s
        self.deadline = deadline
        self.headers = headers
        self.context_words = context_words
        self.result = CallerResult()
        self._audio = np.zeros(0, np.int16)  # what the microphone says next
        self._turn: Turn | None = None
        self._t0 = time.monotonic()  # the microphone's clock: chunk i leaves at t0 + i * 20 ms
        self._old_ids: set[str] = set()  # responses from before the current question
        self._created: dict[str, float] = {}
        self._first_audio = asyncio.Event()
        self._done = asyncio.Event()
        self._seeded = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession) -> CallerResult:
        try:
            ws = await session.ws_connect(
                self.url, protocols=("realtime",), headers=self.headers, heartbeat=30
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 503:
                self.result.rejected = True
            else:
                self.result.errors.append(f"handshake: HTTP {exc.status}")
            return self.result
        except (aiohttp.ClientError, OSError) as exc:
            self.result.errors.append(f"connect: {exc}")
            return self.result
        async with ws:
            try:
                first = await ws.receive(timeout=30)
            except asyncio.TimeoutError:
                self.result.errors.append("no session.created within 30 s")
                return self.result
            event = json.loads(first.data) if first.type == aiohttp.WSMsgType.TEXT else {}
            if event.get("type") != "session.created":
                code = (event.get("error") or {}).get("code")
                if code in REJECT_CODES:
                    self.result.rejected = True
                else:
                    self.result.errors.append(f"no session.created: {str(event)[:200]}")
                return self.result
            reader = asyncio.create_task(self._read(ws))
            if self.context_words:
                await self._seed_context(ws)
            mic = asyncio.create_task(self._microphone(ws))
            try:
                await self._converse()
            finally:
                mic.cancel()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await mic
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
        return self.result

    async def _seed_context(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """A long earlier exchange in the conversation (``--context-words`` words of text as a
        user message), so that each caller's context is that long; it is pre-filled at the
        first turn, whose figures are then kept apart (``warm_up``)."""
        words = (FILLER * (self.context_words // len(FILLER) + 1))[: self.context_words]
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": " ".join(words)}],
        }
        self._seeded.clear()
        await ws.send_str(json.dumps({"type": "conversation.item.create", "item": item}))
        try:
            await asyncio.wait_for(self._seeded.wait(), 30)
        except asyncio.TimeoutError:
            self.result.errors.append("seeded context not acknowledged within 30 s")

    async def _microphone(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """20 ms of audio every 20 ms, each sent when the microphone would have it (at the end
        of its 20 ms), from a schedule that never drifts."""
        self._t0 = t0 = time.monotonic()
        silence = np.zeros(CHUNK, np.int16)
        i = 0
        while True:
            i += 1
            delay = t0 + i * CHUNK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(self._audio):
                chunk, self._audio = self._audio[:CHUNK], self._audio[CHUNK:]
                if len(chunk) < CHUNK:
                    chunk = np.concatenate([chunk, silence[: CHUNK - len(chunk)]])
            else:
                chunk = silence
            msg = {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}
            await ws.send_str(json.dumps(msg))

    async def _say(self, clip: Clip, barge_in: bool) -> Turn:
        """Queue ``clip`` on the microphone; the turn's true end is when its last loud sample
        leaves the microphone (plus the wait for the rest of the chunk holding it)."""
        turn = Turn(clip.text, barge_in, warm_up=bool(self.context_words) and not self.result.turns)
        self._old_ids = set(self._created)
        self._first_audio.clear()
        self._done.clear()
        # The clip starts in the chunk the microphone sends next (at boundary b, holding the
        # audio of the 20 ms before b): its sample at time s is spoken at b - 20 ms + s.
        ticks = np.ceil((time.monotonic() - self._t0) / CHUNK_S)
        turn.t_end = self._t0 + (ticks - 1) * CHUNK_S + clip.end_s
        self._audio = np.concatenate([self._audio, clip.pcm])
        self._turn = turn
        self.result.turns.append(turn)
        return turn

    async def _converse(self) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))  # callers do not all start at once
        for k in range(self.n_turns):
            if time.monotonic() > self.deadline:
                break
            clip = self.clips[(self.idx + k) % len(self.clips)]
            cut_in = self.barge_in and k > 0 and self.result.turns[-1].first_packet_s is not None
            turn = await self._say(clip, cut_in)
            try:
                wait = turn.t_end + self.answer_timeout_s - time.monotonic()
                await asyncio.wait_for(self._first_audio.wait(), max(0.0, wait))
            except asyncio.TimeoutError:
                # counted as an error; a later first packet is still recorded as its latency
                self.result.errors.append(f"no answer within {self.answer_timeout_s:g} s")
                continue
            if self.barge_in and k + 1 < self.n_turns:
                # cut in while the answer plays: the next question starts shortly after it began
                await asyncio.sleep(self.rng.uniform(0.3, 0.8))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._done.wait(), 60)
            if turn.status is None:
                self.result.errors.append("answer did not finish within 60 s")
            await asyncio.sleep(self.rng.uniform(*self.pause_s))
        # let the last answer finish, then hang up
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._done.wait(), 30)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            ev = json.loads(msg.data)
            kind = ev.get("type")
            turn = self._turn
            if self.trace and not kind.endswith(".delta"):
                rel = f"{now - turn.t_end:+7.2f}" if turn else "       "
                print(f"caller {self.idx} {rel} s  {kind}", file=sys.stderr, flush=True)
            if kind == "response.created":
                self._created[ev["response"]["id"]] = now
            elif kind in ("response.output_audio.delta", "response.audio.delta"):
                rid = ev.get("response_id")
                if (
                    turn is not None
                    and turn.first_packet_s is None
                    and rid not in self._old_ids
                    and now >= turn.t_end
                ):
                    turn.first_packet_s = now - turn.t_end
                    turn.response_id = rid
                    turn.play_end = now
                    self._first_audio.set()
                if turn is not None and rid == turn.response_id:
                    self._play(turn, now, ev.get("delta", ""))
            elif kind == "conversation.item.done" and not self._seeded.is_set():
                self._seeded.set()
            elif kind == "response.done":
                resp = ev["response"]
                if turn is not None and resp.get("id") == turn.response_id:
                    turn.status = resp.get("status")
                    usage = resp.get("usage") or {}
                    tokens = (usage.get("output_token_details") or {}).get("text_tokens", 0)
                    created = self._created.get(resp["id"], now)
                    if turn.status == "completed" and tokens and now > created:
                        turn.tokens_per_s = tokens / (now - created)
                    self._done.set()
                if resp.get("status") == "failed":
                    self.result.errors.append(f"response failed: {resp.get('status_details')}")
            elif kind == "error":
                err = ev.get("error") or {}
                if err.get("code") in REJECT_CODES:
                    self.result.rejected = True
                else:
                    self.result.errors.append(f"{err.get('code')}: {err.get('message')}")

    @staticmethod
    def _play(turn: Turn, now: float, delta: str) -> None:
        """The caller's player: audio plays from the first packet at real-time pace, with no
        buffer beyond what has arrived; a chunk that comes after the audio before it ran out
        (by more than one 20 ms frame) is an underrun: the caller heard a gap."""
        seconds = len(base64.b64decode(delta)) / 2 / RATE
        gap = now - turn.play_end
        if gap > CHUNK_S:
            turn.underruns += 1
            turn.max_gap_s = max(turn.max_gap_s, gap)
            turn.gaps.append((round(turn.audio_s, 2), round(gap, 3)))
        turn.play_end = max(turn.play_end, now) + seconds
        turn.audio_s += seconds


# ---- one load level ------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def run_level(args: argparse.Namespace, url: str, clips: list[Clip], n: int) -> dict:
    deadline = time.monotonic() + args.duration
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    n_barge = round(n * args.barge_in)
    callers = [
        Caller(
            i,
            url,
            clips,
            args.turns,
            i < n_barge,
            (args.pause_min, args.pause_max),
            args.answer_timeout,
            deadline,
            headers,
            args.trace,
            args.context_words,
        )
        for i in range(n)
    ]
    t0 = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        first: dict[str, float] = {}
        sampler = asyncio.create_task(sample_metrics(session, url, headers, first))
        try:
            results = await asyncio.gather(*(c.run(session) for c in callers))
        finally:
            sampler.cancel()
            peak = await sampler
    wall = time.monotonic() - t0
    all_turns = [t for r in results for t in r.turns]
    turns = [t for t in all_turns if not t.warm_up]
    warm = [t.first_packet_s for t in all_turns if t.warm_up and t.first_packet_s is not None]
    fp = [t.first_packet_s for t in turns if t.first_packet_s is not None]
    tps = [t.tokens_per_s for t in turns if t.tokens_per_s is not None]
    # speech starved: answers (played to their end, not cut in on) whose audio had a gap
    played = [t for t in turns if t.status == "completed" and t.audio_s > 0]
    return {
        "first_packet_s": {
            "p50": percentile(fp, 50),
            "p95": percentile(fp, 95),
            "p99": percentile(fp, 99),
            "max": max(fp) if fp else None,
        },
        "answer_tokens_per_s": statistics.median(tps) if tps else None,
        "starved_answers": sum(t.underruns > 0 for t in played),
        "completed_answers": len(played),
        "underruns": sum(t.underruns for t in played),
        "max_gap_s": max((t.max_gap_s for t in played), default=0.0),
        "answer_audio_s_p50": statistics.median(t.audio_s for t in played) if played else None,
        "first_turn_first_packet_s": {  # --context-words: the turn that pre-filled the context
            "p50": percentile(warm, 50),
            "p95": percentile(warm, 95),
            "max": max(warm) if warm else None,
        }
        if args.context_words
        else None,
        "engine_peak": peak,  # the largest value of each /metrics engine stat during the level
        # the engine's device time during the level, by kind of work, and its share of the
        # level's wall time (what the GPU spent its time on; engines that time their work)
        "engine_gpu_s": {
            k.removeprefix("gpu_ms_"): {
                "s": round((peak[k] - first.get(k, 0.0)) / 1000, 2),
                "share": round((peak[k] - first.get(k, 0.0)) / 1000 / wall, 3),
            }
            for k in sorted(peak)
            if k.startswith("gpu_ms_") and wall > 0
        },
        # the engine's pre-fill passes during the level, by why each ran (scheduler.py)
        "prefill_passes": {
            k.removeprefix("prefill_passes_"): int(peak[k] - first.get(k, 0.0))
            for k in sorted(peak)
            if k.startswith("prefill_passes_")
        },
        "rejected": sum(r.rejected for r in results),
        "errors": sum(len(r.errors) for r in results),
        "error_samples": sorted({e for r in results for e in r.errors})[:5],
        "turns": len(turns),
        "answered": len(fp),
        # every turn, to find what a tail is made of (caller, its turn, cut in or not)
        "turn_records": [
            {
                "caller": c,
                "turn": i,
                "barge_in": t.barge_in,
                "first_packet_s": None if t.first_packet_s is None else round(t.first_packet_s, 3),
                "status": t.status,
                "audio_s": round(t.audio_s, 2),
                "underruns": t.underruns,
                "max_gap_s": round(t.max_gap_s, 3),
                "gaps": t.gaps[:8],  # where in the answer's audio each gap came, and how long
            }
            for c, r in enumerate(results)
            for i, t in enumerate(r.turns)
            if not t.warm_up
        ],
        "barge_in_callers": n_barge,
        "wall_s": round(wall, 1),
        "loadavg_after": os.getloadavg(),
    }


async def sample_metrics(
    session: aiohttp.ClientSession,
    ws_url: str,
    headers: dict[str, str],
    first: dict[str, float] | None = None,
) -> dict[str, float]:
    """Poll the server's ``/metrics`` every 0.5 s until cancelled; the peak of each engine stat
    (sessions, lanes in use, KV pages and positions used) and the last value of each engine
    event counter (and of the totals that only grow, such as ``gpu_ms_*``); ``first`` gets the
    first sample. Empty if the server has no ``/metrics`` or it needs other credentials."""
    u = urlparse(ws_url)
    url = f"http://{u.netloc}/metrics"
    peak: dict[str, float] = {}
    line = re.compile(r'^agent_engine(?:_events)?\{(?:stat|event)="([a-z_0-9]+)"\} ([0-9.e+]+)$')
    try:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    if r.status == 200:
                        for m in map(line.match, (await r.text()).splitlines()):
                            if m:
                                peak[m[1]] = max(peak.get(m[1], 0.0), float(m[2]))
                                if first is not None:
                                    first.setdefault(m[1], float(m[2]))
            await asyncio.sleep(0.5)
    except asyncio.CancelledError:
        return peak
    return peak


# ---- the server ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def serve_child(config: str, port: int, sets: list[str], device_model: str = "") -> None:
    """The server process: ``serve`` with the config and its overrides (and with
    ``device_model``, the GPU's times imposed on a CPU engine: ``bench/device_model.py``)."""
    from realtime.config import load_config
    from realtime.server.app import serve

    if device_model:
        from bench.device_model import install

        install(device_model)

    serve(load_config(config, parse_sets(sets)), "127.0.0.1", port)


async def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-child", "--port", str(port)]
    cmd += ["--config", args.config] + [a for s in args.set for a in ("--set", s)]
    if args.device_model:
        cmd += ["--device-model", args.device_model]
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    health = f"http://127.0.0.1:{port}/healthz"
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"the server exited ({proc.returncode}); see --server-log")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(health) as r:
                    if r.status == 200:
                        return proc, f"ws://127.0.0.1:{port}/v1/realtime"
            await asyncio.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not come up within 300 s")


# ---- main ----------------------------------------------------------------------------------
def table(load: dict[str, dict]) -> str:
    head = f"{'N':>4} {'turns':>6} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'tok/s':>7} {'rejected':>9} {'errors':>7} {'starved':>8}"
    rows = [head, "-" * len(head)]

    def f(x: float | None) -> str:
        return f"{x:7.3f}" if x is not None else f"{'-':>7}"

    for n, r in load.items():
        fp = r["first_packet_s"]
        tps = r["answer_tokens_per_s"]
        rows.append(
            f"{n:>4} {r['turns']:>6} {f(fp['p50'])} {f(fp['p95'])} {f(fp['p99'])} "
            f"{f(tps)} {r['rejected']:>9} {r['errors']:>7} "
            f"{r['starved_answers']:>3}/{r['completed_answers']:<4}"
        )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> dict:
    voices = [v for v in args.voices.split(",") if available(v)]
    if not voices:
        raise SystemExit("no test voice available: install espeak-ng or flite")
    clips = make_clips(voices, list(QUESTIONS))
    proc = None
    url = args.url
    if url:
        check_loopback(url)
    else:
        proc, url = await start_server(args)
    load: dict[str, dict] = {}
    try:
        for n in [int(x) for x in args.n.split(",")]:
            print(f"N = {n}: {n} caller(s), {args.turns} turn(s) each ...", flush=True)
            load[str(n)] = r = await run_level(args, url, clips, n)
            print(table({str(n): r}).splitlines()[-1], flush=True)
            for e in r["error_samples"]:
                print(f"     error: {e}", flush=True)
            if r["engine_gpu_s"]:
                busy = ", ".join(
                    f"{k} {v['s']:.1f} s ({100 * v['share']:.0f}%)"
                    for k, v in r["engine_gpu_s"].items()
                )
                print(f"     engine device time in {r['wall_s']} s: {busy}", flush=True)
            if r["prefill_passes"]:
                why = ", ".join(f"{k} {v}" for k, v in r["prefill_passes"].items())
                print(f"     pre-fill passes: {why}", flush=True)
            if args.out:  # a level's figures survive a run killed before the end
                write_json(args.out, result_of(args, url, voices, load))
            p95 = r["first_packet_s"]["p95"]
            if args.stop_above and (p95 is None or p95 > args.stop_above):
                print(
                    f"p95 {p95} s is above --stop-above {args.stop_above} s: stopping", flush=True
                )
                break
            await asyncio.sleep(2)  # the server closes the last level's sessions
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()
    return result_of(args, url, voices, load)


def result_of(args: argparse.Namespace, url: str, voices: list[str], load: dict[str, dict]) -> dict:
    """The run's JSON: what ran where, and the figures of each level measured so far."""
    return {
        "machine": args.machine
        or f"{platform.node()} {platform.machine()} {len(os.sched_getaffinity(0))} cores",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": args.config if not args.url else None,
        "device_model": args.device_model or None,  # set: the engine times are emulated
        "target": url,
        "turns_per_caller": args.turns,
        "barge_in_share": args.barge_in,
        "voices": voices,
        "loadavg_before": LOADAVG_BEFORE,
        "loadavg_after": os.getloadavg(),
        "load": load,
    }


LOADAVG_BEFORE = os.getloadavg()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running server's ws://HOST:PORT/v1/realtime (loopback only)")
    p.add_argument("--config", default="embedded", help="the server's config when started here")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the started server, e.g. server.max_sessions=64",
    )
    p.add_argument("--n", default="1,4,16,32", help="caller counts, comma-separated")
    p.add_argument("--turns", type=int, default=3, help="questions per caller")
    p.add_argument("--duration", type=float, default=300, help="each level stops after this")
    p.add_argument("--barge-in", type=float, default=0.25, help="share of callers who cut in")
    p.add_argument("--pause-min", type=float, default=1.0)
    p.add_argument("--pause-max", type=float, default=3.0)
    p.add_argument("--answer-timeout", type=float, default=20.0)
    p.add_argument(
        "--stop-above",
        type=float,
        default=0.0,
        help="stop raising N once first-packet p95 exceeds this many seconds",
    )
    p.add_argument("--voices", default=",".join(DEFAULT_VOICES))
    p.add_argument(
        "--context-words",
        type=int,
        default=0,
        help="seed each conversation with a user message of this many words before the first "
        "question (a long call's context); the first turn, which pre-fills it, is reported apart. "
        "Words, not tokens: in the step-audio-random tokenizer 1600 words are 3937 tokens",
    )
    p.add_argument("--api-key", default=os.environ.get("REALTIME_AGENT_API_KEY", ""))
    p.add_argument("--machine", default="", help="label for the JSON (default: this host)")
    p.add_argument("--server-log", default="", help="the started server's output goes here")
    p.add_argument("--trace", action="store_true", help="print each caller's events (stderr)")
    p.add_argument("--out", default="", help="write the JSON here")
    p.add_argument(
        "--device-model",
        default="",
        choices=["", *MODELS],
        help="impose the H100's measured engine times on a CPU engine (figures are emulated)",
    )
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_child:
        serve_child(args.config, args.port, args.set, args.device_model)
        return
    if args.url:
        try:
            check_loopback(args.url)
        except ValueError as exc:
            p.error(str(exc))
    result = asyncio.run(main_async(args))
    print()
    print(f"{result['machine']}; {result['date']}; load average {result['loadavg_before']}")
    print(table(result["load"]))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
