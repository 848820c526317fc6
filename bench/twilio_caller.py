"""Twilio's side of a Media Stream, for tests and benchmarks of ``/twilio``: it streams the
caller's audio in real time (silence between utterances, as Twilio does), plays the agent's
``media`` in real time from a play-out buffer, echoes each ``mark`` once the audio before it
has played, and on ``clear`` empties the buffer and sends the marks still pending back (as
Twilio does). Every message from the server is kept with the time it arrived.

    async with call("ws://127.0.0.1:8080") as twilio:
        await twilio.say(pcm_8khz_int16)
        await twilio.wait_for(twilio.end_mark, 60)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import websockets

from realtime.frames import Frame
from realtime.server.codecs import ulaw_encode

SID = "MZ0123456789abcdef"
FRAME_S = 0.02


def start_event(encoding: str = "audio/x-mulaw", rate: int = 8000) -> dict[str, Any]:
    """Twilio's ``start`` message for a call with one inbound track of ``encoding`` at ``rate``."""
    return {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": SID,
        "start": {
            "streamSid": SID,
            "accountSid": "AC1",
            "callSid": "CA1",
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
        },
    }


@dataclass
class Received:
    t: float  # monotonic time it arrived
    msg: dict[str, Any]


@dataclass
class Twilio:
    """The Twilio end of one call (see the module's docstring)."""

    ws: Any
    received: list[Received] = field(default_factory=list)
    echoed: list[tuple[float, str]] = field(default_factory=list)  # (when, mark) played
    pending: list[tuple[float, str]] = field(default_factory=list)  # (plays at, mark)
    drained_at: float = 0.0  # when the play-out buffer runs dry
    played_at_clear: float | None = None  # seconds of agent audio played when `clear` came
    cleared_s: float = 0.0  # agent audio dropped from the buffer by `clear`, never played
    _media_s: float = 0.0
    _frames: deque[np.ndarray] = field(default_factory=deque)  # the caller's audio to send
    _said: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _start(self) -> None:
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send(start_event())
        loop = asyncio.get_running_loop()
        for coro in (self._stream(), self._receive(), self._play_marks()):
            self._tasks.append(loop.create_task(coro))

    async def _hang_up(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await task

    async def stop(self) -> None:
        """The call ends: Twilio's ``stop`` (the session finishes the turn in flight)."""
        await self._hang_up()
        await self._send({"event": "stop", "streamSid": SID, "stop": {"callSid": "CA1"}})

    async def _send(self, msg: dict[str, Any]) -> None:
        async with self._lock:
            await self.ws.send(json.dumps(msg))

    async def say(self, pcm: np.ndarray) -> float:
        """The caller says ``pcm`` (8 kHz int16); returns when the last of it was sent."""
        data = np.asarray(pcm, np.int16)
        data = np.concatenate([data, np.zeros(-len(data) % 160, np.int16)])
        self._said.clear()
        self._frames.extend(data.reshape(-1, 160))
        await self._said.wait()
        return time.monotonic()

    async def _stream(self) -> None:
        """The caller's line in real time: queued speech, else silence (as Twilio sends)."""
        t0, n = time.monotonic(), 0
        silence = np.zeros(160, np.int16)
        while True:
            frame = self._frames.popleft() if self._frames else silence
            payload = base64.b64encode(ulaw_encode(frame)).decode()
            n += 1
            await self._send(
                {
                    "event": "media",
                    "sequenceNumber": str(n + 1),
                    "streamSid": SID,
                    "media": {"track": "inbound", "chunk": str(n), "payload": payload},
                }
            )
            if not self._frames:
                self._said.set()
            await asyncio.sleep(max(0.0, t0 + n * FRAME_S - time.monotonic()))

    async def _receive(self) -> None:
        while True:
            msg = json.loads(await self.ws.recv())
            now = time.monotonic()
            self.received.append(Received(now, msg))
            event = msg["event"]
            if event == "media":
                seconds = len(base64.b64decode(msg["media"]["payload"])) / 8000
                self.drained_at = max(self.drained_at, now) + seconds
                self._media_s += seconds
            elif event == "mark":
                self.pending.append((self.drained_at, msg["mark"]["name"]))
            elif event == "clear":
                unplayed = max(0.0, self.drained_at - now)
                self.cleared_s += unplayed
                self._media_s -= unplayed
                self.played_at_clear = self.played_s(now)
                self.drained_at = now
                cleared, self.pending = self.pending, []
                for _, name in cleared:  # Twilio sends the cleared marks back
                    await self._send({"event": "mark", "streamSid": SID, "mark": {"name": name}})

    def played_s(self, now: float) -> float:
        """Seconds of agent audio played so far (all answers)."""
        return self._media_s - max(0.0, self.drained_at - now)

    async def _play_marks(self) -> None:
        while True:
            now = time.monotonic()
            while self.pending and self.pending[0][0] <= now:
                _, name = self.pending.pop(0)
                self.echoed.append((now, name))
                await self._send({"event": "mark", "streamSid": SID, "mark": {"name": name}})
            await asyncio.sleep(0.005)

    def events(self, name: str) -> list[Received]:
        return [r for r in self.received if r.msg["event"] == name]

    async def wait_for(self, check: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.01)

    def end_mark(self) -> str | None:
        names = [r.msg["mark"]["name"] for r in self.events("mark")]
        return next((n for n in names if n.endswith("-end")), None)


@contextlib.asynccontextmanager
async def call(base_url: str) -> AsyncIterator[Twilio]:
    """A call to ``base_url``/twilio; leaving it without ``stop()`` hangs up (the socket just
    closes)."""
    async with websockets.connect(f"{base_url}/twilio") as ws:
        twilio = Twilio(ws)
        await twilio._start()
        try:
            yield twilio
        finally:
            await twilio._hang_up()


def spy(session: Any) -> list[tuple[float, Frame | str]]:
    """The frames the turn controller gets and its interruptions ("interrupt"), timed."""
    seen: list[tuple[float, Frame | str]] = []
    c = session.controller
    process, interrupt = c.process, c.interrupt

    async def on_frame(frame: Frame) -> None:
        seen.append((time.monotonic(), frame))
        await process(frame)

    async def on_interrupt() -> None:
        if c.response is not None:
            seen.append((time.monotonic(), "interrupt"))
        await interrupt()

    c.process, c.interrupt = on_frame, on_interrupt
    return seen


def ahead_s(media: list[Received]) -> list[float]:
    """For each ``media`` message: how far the audio received by then runs ahead of the time
    since the first one (what the play-out buffer holds, if it started with the first)."""
    t0, sent, out = media[0].t if media else 0.0, 0.0, []
    for r in media:
        sent += len(base64.b64decode(r.msg["media"]["payload"])) / 8000
        out.append(sent - (r.t - t0))
    return out


def audio_s(media: list[Received]) -> float:
    return sum(len(base64.b64decode(r.msg["media"]["payload"])) for r in media) / 8000
