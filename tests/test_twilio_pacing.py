"""/twilio paces the answer in real time, a little ahead (``telephony.playout_lead_ms``), so
that a backchannel spoken over it cuts nothing and an interruption has only the lead to clear.

The client plays Twilio's part as Twilio does it: it streams the caller's audio in real time
(silence between utterances), plays the agent's ``media`` in real time from a play-out
buffer, echoes each ``mark`` once the audio before it has played, and on ``clear`` empties the
buffer and echoes the marks still pending. The session behind it is the real one."""

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
import pytest
import pytest_asyncio
import websockets
from server_helpers import RunningServer, speech, start_server
from test_server_twilio import SID, start_message
from test_telephony import _engine_prompt, _the_session

from realtime.config import ServerConfig
from realtime.frames import Frame, SpeechStarted, SpeechStopped, Transcript
from realtime.server.codecs import ulaw_encode

pytestmark = pytest.mark.asyncio(loop_scope="module")

ASK = "Tell me about the city of Paris."
FRAME_S = 0.02
WATCH_S = 4.0  # seconds of an answer watched for its pace


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    if getattr(server_runtime, "config", None) is None:
        pytest.skip("needs the real Session (SERVER_TESTS_FAKE_RUNTIME is set)")
    srv = await start_server(server_runtime, ServerConfig())
    yield srv
    await srv.runner.cleanup()


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
    played_at_clear: float | None = None  # seconds of the answer played when it was cleared
    _first_media: float | None = None
    _media_s: float = 0.0
    _frames: deque[np.ndarray] = field(default_factory=deque)  # the caller's audio to send
    _said: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _start(self) -> None:
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send(json.loads(start_message()))
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
                if self._first_media is None:
                    self._first_media = now
                self.drained_at = max(self.drained_at, now) + seconds
                self._media_s += seconds
            elif event == "mark":
                self.pending.append((self.drained_at, msg["mark"]["name"]))
            elif event == "clear":
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
async def call(server: RunningServer) -> AsyncIterator[Twilio]:
    """A call to /twilio; leaving it without ``stop()`` hangs up (the socket just closes)."""
    async with websockets.connect(f"{server.ws}/twilio") as ws:
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


async def ask(twilio: Twilio) -> None:
    """Ask the question; return once the answer's first audio has arrived."""
    await twilio.say(speech(ASK, 8000))
    await twilio.wait_for(lambda: twilio.events("media"), 120)


async def closed(runtime: Any) -> None:
    async with asyncio.timeout(20):
        while runtime.sessions:
            await asyncio.sleep(0.05)


def audio_s(records: list[Received]) -> float:
    return sum(len(base64.b64decode(r.msg["media"]["payload"])) for r in records) / 8000


async def test_media_runs_at_most_the_lead_ahead_of_real_time(
    server: RunningServer, server_runtime: Any
) -> None:
    lead = server_runtime.config.telephony.playout_lead_ms / 1000
    async with call(server) as twilio:
        await _the_session(server_runtime)
        await ask(twilio)
        await asyncio.sleep(WATCH_S)  # then hang up: the rest of the answer goes the same way
        end = twilio.end_mark()
    await closed(server_runtime)
    media = twilio.events("media")
    t0 = media[0].t
    sent, ahead = 0.0, []
    for r in media:
        sent += len(base64.b64decode(r.msg["media"]["payload"])) / 8000
        ahead.append(sent - (r.t - t0))  # audio received beyond the time it takes to play
    assert end is None and sent > WATCH_S - 0.5, f"{sent:.2f} s of answer tell little"
    # never more than the lead (and the frame just sent) ahead; scheduling slack 80 ms
    assert max(ahead) <= lead + FRAME_S + 0.08, f"{max(ahead):.3f} s ahead, lead {lead} s"
    # the lead fills at once: the first packet is not held back, and the buffer is used
    assert max(ahead[: int(lead / FRAME_S) + 1]) >= lead - 0.05, ahead[:20]


async def test_a_backchannel_over_the_answer_cuts_nothing(
    server: RunningServer, server_runtime: Any
) -> None:
    async with call(server) as twilio:
        session = await _the_session(server_runtime)
        seen = spy(session)
        await ask(twilio)
        answered_at = time.monotonic()
        await asyncio.sleep(0.5)
        assert twilio.end_mark() is None, "the answer ended before the backchannel"
        await twilio.say(speech("Okay.", 8000, pad_s=0.0))
        await twilio.wait_for(twilio.end_mark, 120)
        end = twilio.end_mark()
        ended_at = twilio.events("mark")[-1].t
        await twilio.wait_for(lambda: not twilio.pending, 10)  # played to its end
        await session.wait_idle()
        await twilio.stop()
    await closed(server_runtime)
    started = [t for t, f in seen if isinstance(f, SpeechStarted) and t > answered_at]
    assert started, "the backchannel was not heard as speech"
    judged = [t for t, f in seen if isinstance(f, Transcript) and f.final and t > started[0]]
    assert judged and judged[0] < ended_at, "judged only once the answer had all gone out"
    assert "interrupt" not in [f for _, f in seen]
    assert not twilio.events("clear")
    # every bit of the answer reached the caller: the -end mark's ms, in 20 ms frames
    assert end is not None
    answer_ms = int(end.split(":")[1].split("-")[0])
    assert audio_s(twilio.events("media")) * 1000 >= answer_ms
    entry = session.history[-1]
    assert not entry.interrupted and entry.spoken == entry.answer.strip()
    assert len(session.history) == 1  # the backchannel was not a turn


async def test_an_interruption_clears_and_truncates_at_the_heard_word(
    server: RunningServer, server_runtime: Any
) -> None:
    async with call(server) as twilio:
        session = await _the_session(server_runtime)
        seen = spy(session)
        await ask(twilio)
        answered_at = time.monotonic()
        # the caller listens until the first piece boundary has played, then talks over it
        await twilio.wait_for(lambda: twilio.echoed, 60)
        assert twilio.end_mark() is None, "the answer ended before the interruption"
        said_at = await twilio.say(speech("Wait, stop. Tell me about Rome instead.", 8000, 0.0))
        await twilio.wait_for(lambda: twilio.events("clear"), 30)
        (clear,) = twilio.events("clear")
        rid = int(twilio.echoed[0][1].split(":")[0])
        # the interrupting words are a turn: once they have ended, it is answered
        await twilio.wait_for(
            lambda: any(isinstance(f, SpeechStopped) and t > said_at - 1 for t, f in seen), 30
        )
        await session.wait_idle()
        prompt = await _engine_prompt(session)
        await twilio.stop()
    await closed(server_runtime)
    started = next(t for t, f in seen if isinstance(f, SpeechStarted) and t > answered_at)
    cut = next(t for t, f in seen if f == "interrupt")
    # cleared once judged an interruption (not at the first speech), and at once (slack for a
    # loaded machine)
    assert started + 0.3 < cut <= clear.t < cut + 0.5
    # nothing more of that answer: no media from the clear until the caller had finished
    # speaking and a new answer could start
    late = [r for r in twilio.events("media") if clear.t < r.t <= said_at + 0.4]
    assert not late, f"{len(late)} media messages after the clear"
    # what the caller heard: the marks Twilio played before the clear
    played = [name for t, name in twilio.echoed if t < clear.t and name.startswith(f"{rid}:")]
    ms = int(played[-1].split(":")[1])
    assert twilio.played_at_clear is not None and twilio.played_at_clear * 1000 >= ms
    entry = next(e for e in session.history if e.response and e.response.id == rid)
    pieces = entry.response.pieces
    words = [p.text.strip() for p in pieces if p.offset_s * 1000 < ms]
    assert words and len(words) < len(pieces)  # cut between two pieces
    assert entry.interrupted and entry.spoken == " ".join(words)
    assert json.dumps(entry.spoken + " ...")[1:-1] in prompt, prompt
    assert json.dumps(entry.answer.strip())[1:-1] not in prompt
