"""Hypothesis fuzzing of every protocol handler, on the real pipeline (``server_runtime``):

- Realtime events over a real ``/v1/realtime`` WebSocket, as sequences mixing bad messages with
  valid steps out of order (commit before audio, cancel with no response, ...);
- WebRTC data-channel commands (``webrtc._on_message`` on a peer with a real session);
- ``POST /offer`` bodies (broken JSON, broken SDP, a real offer mangled);
- Twilio Media Streams frames over a real ``/twilio`` WebSocket.

Every bad input must get an error (an ``error`` event, a 4xx, or for a fatal Twilio format an
error then a close), never a handler crash (``server_error``) or a hang; afterwards each
connection answers a normal spoken turn. ``FUZZ_SCALE`` multiplies the number of examples
(``make fuzz`` runs 10x); the inputs sent are counted and printed, and all four handlers
together must reach 10,000 inputs."""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import os
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from fuzz_inputs import (
    SID,
    Bad,
    Commit,
    Giant,
    OddPcm,
    Silence,
    TwilioMedia,
    TwilioStart,
    TwilioStop,
    Valid,
    datachannel_bad,
    offer_bad,
    realtime_cases,
    silence_b64,
    twilio_cases,
)
from hypothesis import HealthCheck, Phase, example, given, settings
from server_helpers import QUESTION, RunningServer, speech, start_server

from realtime.config import ServerConfig
from realtime.server import json_depth, webrtc
from realtime.server.app import CTX_KEY
from realtime.server.codecs import ulaw_encode

LIMIT = 32 * 1024
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
TURN_TIMEOUT_S = 300.0  # a spoken turn, on a CPU that may be shared with other work
CASE_TIMEOUT_S = 600.0  # one sequence; a hang is caught sooner, by REPLY_TIMEOUT_S per reply
REPLY_TIMEOUT_S = 60.0  # a hang; generous, as a loaded CI machine is slow
OPEN_TIMEOUT_S = 60.0  # a real session primes the engine first (seconds on a busy CPU)
COUNTS: collections.Counter[str] = collections.Counter()
MIN_TOTAL = 10_000


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        # the connections carry state from case to case, so a failing case does not replay
        # alike: report it as found, unshrunk
        phases=[Phase.explicit, Phase.generate],
        # `make test` replays the same inputs every run (a CI run is reproducible); `make fuzz`
        # (FUZZ_SCALE > 1) draws new ones
        derandomize=SCALE <= 1,
    )


class FirstFailure:
    """The first error of a stateful fuzz, raised again when Hypothesis replays the failing case
    to report it: the connections carry state, so a replay fails otherwise (on a connection the
    first failure ended), and the first error would be lost."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def run(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        if self.error is not None:
            coro.close()
            raise self.error
        try:
            loop.run_until_complete(asyncio.wait_for(coro, CASE_TIMEOUT_S))
        except BaseException as exc:
            self.error = exc
            raise


@pytest.fixture(scope="module")
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture(scope="module")
def server(loop: asyncio.AbstractEventLoop, server_runtime: Any) -> Any:
    # no idle timeout: between examples the test's event loop (the server's too) stands still
    # while Hypothesis draws the next one, and a connection must outlive the whole fuzz; the
    # limit has its own tests (tests/test_server_limits.py)
    config = ServerConfig(max_message_bytes=LIMIT, max_sessions=16, idle_timeout_s=0)
    srv = loop.run_until_complete(start_server(server_runtime, config))
    yield srv
    loop.run_until_complete(srv.runner.cleanup())


async def healthz(srv: RunningServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{srv.http}/healthz") as r:
        assert r.status == 200
        return await r.json()


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> aiohttp.WSMessage:
    """The next message within ``timeout`` s (aiohttp's own receive timeout starts again at each
    ping the server sends, every 30 s, so with it a server that never answers is never caught)."""
    async with asyncio.timeout(timeout):
        return await ws.receive()


def task_stacks() -> str:
    """Where each task of the running loop (the client's and the server's) waits: for a hang."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=6, file=out)
    return out.getvalue()


async def expect_close(ws: aiohttp.ClientWebSocketResponse, code: int) -> None:
    """The server closes the socket with ``code`` (other messages before it are skipped)."""
    while True:
        msg = await receive(ws, REPLY_TIMEOUT_S)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            assert ws.close_code == code, (msg, ws.close_code)
            return
        assert msg.type == aiohttp.WSMsgType.TEXT, msg


# Inputs the fuzz once found crashing a handler (see docs/reliability.md), tried first.
FOUND_REALTIME = [
    Bad("[" * 5000, "nested too deep"),
    Bad("4" * 5000, "a number over Python's int conversion limit"),
    Bad(json.dumps({"type": "conversation.item.delete", "item_id": {}}), "unhashable item_id"),
    Bad(json.dumps({"type": "conversation.item.truncate", "item_id": [], "audio_end_ms": 0})),
    Bad(json.dumps({"type": "session.update", "session": {"audio": {"input": "format"}}})),
    Bad(json.dumps({"type": "session.update", "session": {"audio": {"output": 5}}})),
    Silence(200),
    Commit(),
    Bad(json.dumps({"type": "response.create", "response": 7}), "no wait for a transcript"),
]
FOUND_TWILIO = [
    Bad('{"event": "start", "start": {"mediaFormat": "x"}}', "mediaFormat not an object"),
    Bad('{"event": "dtmf", "dtmf": [1]}', "dtmf not an object"),
    Bad('{"event": "mark", "mark": 5}', "mark without a name"),
    Bad("[" * 5000, "nested too deep"),
    Bad("4" * 5000, "a number over Python's int conversion limit"),
]


# ---- /v1/realtime ----------------------------------------------------------------------------
def _event_id(text: str) -> str | None:
    """The ``event_id`` the server may echo in its error (it parses only what fits the limit)."""
    if len(text) > LIMIT:
        return None
    try:
        event = json_depth.loads(text)  # as the server parses it: too deep is refused unread
    except ValueError:
        return None
    if isinstance(event, dict) and isinstance(event.get("event_id"), str):
        return event["event_id"]
    return None


class RealtimeClient:
    """One WebSocket to /v1/realtime, with what the client knows of its state: the input
    format and how much audio is buffered (a commit needs 100 ms)."""

    def __init__(self, srv: RunningServer) -> None:
        self.srv = srv
        self.fmt = "pcm16"
        self.buffered_ms = 0.0
        self.inputs = 0
        self.bad = 0  # bad messages sent, each of which got its own error
        self.connections = 0
        self.errors = collections.Counter[str]()
        # The server's VAD (when turn detection is on) may start a turn on the fuzz's "silence"
        # (A-law's is not zero): it restarts the buffer's count, and may answer the turn, at
        # moments the client cannot know. The client then starts a fresh connection before its
        # next step, and a commit refused as too short meanwhile is no surprise.
        self.vad_moved = False
        self.vad_reconnects = 0
        self.trace: collections.deque[str] = collections.deque(maxlen=40)  # for a failure

    async def open(self) -> None:
        self.http = aiohttp.ClientSession()
        await self.connect()

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(f"{self.srv.ws}/v1/realtime", max_msg_size=0)
        assert (await self.ws.receive_json(timeout=OPEN_TIMEOUT_S))["type"] == "session.created"
        self.fmt, self.buffered_ms, self.vad_moved = "pcm16", 0.0, False
        self.connections += 1

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()

    async def send(self, event: dict[str, Any]) -> str:
        self.inputs += 1
        event_id = f"fz_{self.inputs}"
        await self.ws.send_str(json.dumps({**event, "event_id": event_id}))
        return event_id

    async def next_event(self, what: str = "", timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        try:
            msg = await receive(self.ws, timeout)
        except TimeoutError:
            raise AssertionError(
                f"no reply within {timeout:g} s to {what}\nlast inputs and events:\n"
                + "\n".join(self.trace)
                + f"\nwhere every task waits:\n{task_stacks()}"
            ) from None
        assert msg.type == aiohttp.WSMsgType.TEXT, (
            f"the server ended the connection during {what}: {msg}, close code "
            f"{self.ws.close_code}, {self.ws.exception()!r}"
        )
        event: dict[str, Any] = json.loads(msg.data)
        if event["type"] in (
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
        ):
            self.vad_moved = True
        if not event["type"].endswith(".delta"):
            self.trace.append("<< " + msg.data[:160])
        return event

    async def expect_error(self, event_id: str | None, what: str) -> dict[str, Any]:
        """The next client error; a handler crash (code server_error) fails the test. The
        pipeline's own errors (type server_error, e.g. no_speech) are skipped."""
        while True:
            event = await self.next_event(what)
            if event["type"] != "error":
                continue
            err = event["error"]
            assert err["code"] != "server_error", f"handler crash on {what}: {err}"
            if err["type"] == "server_error":
                continue
            if (
                self.vad_moved
                and err["code"] == "input_audio_buffer_commit_empty"
                and err["event_id"] != event_id
            ):
                continue  # a commit the VAD's restart of the count left short (see above)
            assert err["event_id"] == event_id, (
                f"error for another event ({what}): {err}\nlast inputs and events:\n"
                + "\n".join(self.trace)
            )
            self.errors[err["code"]] += 1
            return err

    async def run(self, case: list[Any]) -> None:
        for op in case:
            await self.step(op)

    async def reconnect(self) -> None:
        await self.ws.close()
        await self.connect()

    async def fresh_if_vad_moved(self) -> None:
        """A fresh connection, whose state the client knows, once the VAD has moved (__init__)."""
        if self.vad_moved:
            self.vad_reconnects += 1
            await self.reconnect()

    async def step(self, op: Any) -> None:
        await self.fresh_if_vad_moved()
        self.trace.append(f">> {self.inputs + 1} {self.fmt} {self.buffered_ms:g} ms {op!r}"[:160])
        if isinstance(op, Bad):
            self.bad += 1
            self.inputs += 1
            await self.ws.send_str(op.text)
            await self.expect_error(_event_id(op.text), f"{op.what}: {op.text[:200]!r}")
        elif isinstance(op, Giant):
            self.inputs += 1
            await self.ws.send_str("x" * op.nbytes)
            await expect_close(self.ws, 1009)
            await self.reconnect()
        elif isinstance(op, Silence):
            await self.send(
                {"type": "input_audio_buffer.append", "audio": silence_b64(self.fmt, op.ms)}
            )
            self.buffered_ms += op.ms
        elif isinstance(op, OddPcm):
            if self.fmt in ("pcm16", "audio/pcm"):
                eid = await self.send(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(bytes(op.nbytes)).decode(),
                    }
                )
                err = await self.expect_error(eid, "odd pcm")
                assert err["code"] == "invalid_audio", err
            else:
                byte = b"\xff" if self.fmt in ("g711_ulaw", "audio/pcmu") else b"\xd5"
                await self.send(
                    {
                        "type": "input_audio_buffer.append",
                        "audio": base64.b64encode(byte * op.nbytes).decode(),
                    }
                )
                self.buffered_ms += 1000 * op.nbytes / 8000
        elif isinstance(op, Commit):
            eid = await self.send({"type": "input_audio_buffer.commit"})
            if self.buffered_ms < 100:
                err = await self.expect_error(eid, "commit before 100 ms")
                assert err["code"] == "input_audio_buffer_commit_empty", err
            self.buffered_ms = 0.0 if self.buffered_ms >= 100 else self.buffered_ms
        elif isinstance(op, Valid):
            await self.send(op.event)
            if op.input_format is not None:
                self.fmt = op.input_format
            if op.clears:
                self.buffered_ms = 0.0
        else:
            raise AssertionError(op)

    async def sync(self) -> None:
        """Every reply so far was as expected: a last bad event gets its own error."""
        await self.fresh_if_vad_moved()
        eid = await self.send({"type": "response.cancel"})
        await self.expect_error(eid, "sync")

    async def spoken_turn(self) -> tuple[str, str, int]:
        """A normal manual turn after the fuzz: transcript, answer text, answer samples."""
        await self.send(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "output_modalities": ["audio"],
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": None,
                        },
                        "output": {"format": {"type": "audio/pcm", "rate": 24000}},
                    },
                },
            }
        )
        await self.send({"type": "input_audio_buffer.clear"})
        pcm = speech(QUESTION, 24000)
        for i in range(0, len(pcm), 4800):
            chunk = base64.b64encode(pcm[i : i + 4800].tobytes()).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})
        commit = await self.send({"type": "input_audio_buffer.commit"})
        print(f"spoken turn committed ({commit})")
        await self.send({"type": "response.create"})
        self.transcript, self.answer, self.samples = "", "", 0
        seen: list[str] = []
        try:
            async with asyncio.timeout(TURN_TIMEOUT_S):
                while True:
                    event = await self.next_event("the spoken turn", TURN_TIMEOUT_S)
                    kind = event["type"]
                    seen.append(kind)
                    if kind in ("input_audio_buffer.committed", "response.done", "error"):
                        print(json.dumps(event)[:300])
                    if self.turn_event(event):
                        return self.transcript, self.answer, self.samples
        except TimeoutError:
            raise AssertionError(f"no answer in {TURN_TIMEOUT_S} s; events: {seen}") from None

    def turn_event(self, event: dict[str, Any]) -> bool:
        """One event of the spoken turn; True at its end."""
        kind = event["type"]
        if kind == "conversation.item.input_audio_transcription.completed":
            self.transcript = event["transcript"]
            print(f"transcript of {event['item_id']}: {event['transcript']!r}")
        elif kind == "response.output_audio.delta":
            self.samples += len(base64.b64decode(event["delta"])) // 2
        elif kind == "response.output_audio_transcript.done":
            self.answer = event["transcript"]
        elif kind == "error":
            assert event["error"]["type"] == "server_error", event  # no client error now
            assert event["error"]["code"] != "server_error", event
        elif kind == "response.done":
            assert event["response"]["status"] == "completed", event
            return True
        return False


def test_realtime_events(loop: asyncio.AbstractEventLoop, server: RunningServer) -> None:
    client = RealtimeClient(server)
    loop.run_until_complete(client.open())
    first = FirstFailure()

    @fuzz_settings(1300)
    @given(realtime_cases(LIMIT))
    @example(FOUND_REALTIME)  # what the fuzz found once, always tried first
    def fuzz(case: list[Any]) -> None:
        first.run(loop, client.run(case))

    # The spoken turn runs on a fresh connection beside the fuzzed one: on the fuzzed one, a
    # late transcript of an earlier commit of silence (Whisper's "you") can be taken for the
    # new turn's, as transcripts are not tied to items (docs/reliability.md).
    fresh = RealtimeClient(server)
    try:
        fuzz()
        loop.run_until_complete(client.sync())
        print(f"\n/v1/realtime: {client.inputs} fuzz inputs", flush=True)
        loop.run_until_complete(fresh.open())
        transcript, answer, samples = loop.run_until_complete(fresh.spoken_turn())
        loop.run_until_complete(client.sync())  # the fuzzed connection still answers
        # a message over the WebSocket's own cap (4x the limit) ends the connection: 1009
        loop.run_until_complete(client.step(Giant(4 * LIMIT + 1)))
    finally:
        loop.run_until_complete(client.close())
        if hasattr(fresh, "ws"):
            loop.run_until_complete(fresh.close())
    COUNTS["realtime"] = client.inputs + fresh.inputs
    print(
        f"\n/v1/realtime: {client.inputs} inputs over {client.connections} connections "
        f"({client.vad_reconnects} after the server VAD moved); "
        f"client errors {dict(client.errors)}"
    )
    assert "capital" in transcript.lower() and "france" in transcript.lower(), transcript
    assert answer.strip() and samples > 24000 * 0.3, (answer, samples)
    assert sum(client.errors.values()) >= client.bad > client.inputs // 3, client.errors
    assert loop.run_until_complete(healthz(server))["sessions"] == 0


# ---- the WebRTC data channel -----------------------------------------------------------------
class RecordingChannel:
    """The data channel's sending side, as ``PeerState`` uses it: what the server sent."""

    readyState = "open"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))
        self.arrived.set()


def _is_command(message: Any) -> bool:
    """A message that is a valid command (the fuzz wants only bad ones)."""
    try:
        cmd = (
            json_depth.loads(message)
            if isinstance(message, str) and len(message) <= LIMIT
            else None
        )
    except ValueError:
        return False
    return isinstance(cmd, dict) and (
        cmd.get("type") == "cancel"
        or (cmd.get("type") == "text" and isinstance(cmd.get("text"), str) and cmd["text"].strip())
    )


def test_datachannel_commands(loop: asyncio.AbstractEventLoop, server: RunningServer) -> None:
    ctx = server.app[CTX_KEY]

    async def open_peer() -> webrtc.PeerState:
        state = webrtc.PeerState(ctx=ctx, pc=RTCPeerConnection())
        state.channel = RecordingChannel()  # type: ignore[assignment]
        state.live = await ctx.open_session("webrtc", pace_output=False, output_sample_rate=48000)
        state.session = state.live.session
        state.spawn(webrtc._pump_frames(state, state.session))
        return state

    state = loop.run_until_complete(open_peer())
    channel: RecordingChannel = state.channel  # type: ignore[assignment]
    inputs = [0]

    async def one(message: Any) -> None:
        inputs[0] += 1
        before = len(channel.sent)
        await webrtc._on_message(state, message)
        replies = channel.sent[before:]
        assert replies, f"no reply to {message!r:.200}"
        # an oversized message is refused by its size (server.max_message_bytes) before parsing
        assert replies[-1]["event"] == "error", replies
        assert replies[-1]["code"] in ("bad_command", "message_too_large"), replies

    @fuzz_settings(2200)
    @given(datachannel_bad(LIMIT).filter(lambda m: not _is_command(m)))
    @example("[" * 5000)
    @example("4" * 5000)
    def fuzz(message: Any) -> None:
        loop.run_until_complete(asyncio.wait_for(one(message), REPLY_TIMEOUT_S))

    async def typed_turn() -> dict[str, Any]:
        await webrtc._on_message(state, json.dumps({"type": "cancel"}))
        await webrtc._on_message(state, json.dumps({"type": "text", "text": QUESTION}))
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while True:
                turns = [e for e in channel.sent if e["event"] == "turn"]
                if turns:
                    return turns[-1]
                channel.arrived.clear()
                await channel.arrived.wait()

    try:
        fuzz()
        turn = loop.run_until_complete(typed_turn())
    finally:
        loop.run_until_complete(state.close())
    COUNTS["datachannel"] = inputs[0] + 2
    print(f"\ndata channel: {inputs[0] + 2} inputs")
    answer = "".join(e["text"] for e in channel.sent if e["event"] == "answer")
    assert turn["transcript"] == QUESTION and answer.strip(), (turn, answer)
    assert not any(
        e["event"] == "error" and e["code"] not in ("bad_command", "message_too_large")
        for e in channel.sent
    )
    assert loop.run_until_complete(healthz(server))["sessions"] == 0


# ---- POST /offer -----------------------------------------------------------------------------
async def _real_offer() -> tuple[RTCPeerConnection, webrtc.SessionAudioTrack, Any]:
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("events")
    mic = webrtc.SessionAudioTrack()
    pc.addTrack(mic)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, mic, channel


def test_offers(loop: asyncio.AbstractEventLoop, server: RunningServer) -> None:
    pc, mic, channel = loop.run_until_complete(_real_offer())
    real_sdp = pc.localDescription.sdp
    http = loop.run_until_complete(_client_session())
    statuses = collections.Counter[int]()

    async def one(body: bytes) -> None:
        async with http.post(f"{server.http}/offer", data=body) as r:
            reply = await r.json()
            assert r.status in (400, 413), (r.status, reply, body[:300])
            assert reply["error"]["message"], reply
            statuses[r.status] += 1

    @fuzz_settings(700)
    @given(offer_bad(LIMIT, real_sdp))
    def fuzz(body: bytes) -> None:
        loop.run_until_complete(asyncio.wait_for(one(body), REPLY_TIMEOUT_S))

    async def spoken_turn() -> list[dict[str, Any]]:
        """The real offer after the fuzz: a spoken question over the microphone track, and a
        bad command on the data channel, answered with events."""
        events: list[dict[str, Any]] = []
        got_turn = asyncio.Event()

        @channel.on("message")
        def on_message(message: str) -> None:
            events.append(json.loads(message))
            if events[-1]["event"] == "turn":
                got_turn.set()

        async with http.post(f"{server.http}/offer", json={"sdp": real_sdp, "type": "offer"}) as r:
            assert r.status == 200, await r.text()
            await pc.setRemoteDescription(RTCSessionDescription(**await r.json()))
        mic.feed(speech(QUESTION, 48000))
        await asyncio.wait_for(got_turn.wait(), TURN_TIMEOUT_S)
        channel.send("{not json")
        await asyncio.sleep(0.5)
        return events

    try:
        fuzz()
        events = loop.run_until_complete(spoken_turn())
    finally:
        loop.run_until_complete(pc.close())
        loop.run_until_complete(http.close())
    inputs = sum(statuses.values()) + 1
    COUNTS["offer"] = inputs
    print(f"\n/offer: {inputs} inputs; statuses {dict(statuses)}")
    finals = [e["text"] for e in events if e["event"] == "transcript" and e["final"]]
    assert finals and "capital" in finals[-1].lower(), events
    assert "".join(e["text"] for e in events if e["event"] == "answer").strip()
    assert any(e["event"] == "error" and e["code"] == "bad_command" for e in events)

    async def drained() -> int:  # the peer's close reaches the server within a few seconds
        for _ in range(100):
            if (await healthz(server))["sessions"] == 0:
                return 0
            await asyncio.sleep(0.1)
        return (await healthz(server))["sessions"]

    assert loop.run_until_complete(drained()) == 0


async def _client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


# ---- /twilio ---------------------------------------------------------------------------------
class TwilioClient:
    """Twilio's side of a media stream; reconnects after a fatal error or a ``stop``."""

    def __init__(self, srv: RunningServer) -> None:
        self.srv = srv
        self.started = False
        self.inputs = 0
        self.bad = 0  # bad messages sent, each of which got its own error
        self.connections = 0
        self.errors = collections.Counter[str]()

    async def open(self) -> None:
        self.http = aiohttp.ClientSession()
        await self.connect()

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(f"{self.srv.ws}/twilio", max_msg_size=0)
        self.started = False
        self.connections += 1

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()

    async def send(self, message: dict[str, Any] | str) -> None:
        self.inputs += 1
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    async def expect_error(self, what: str) -> dict[str, Any]:
        while True:
            try:
                msg = await receive(self.ws, REPLY_TIMEOUT_S)
            except TimeoutError:
                raise AssertionError(f"no reply within {REPLY_TIMEOUT_S} s to {what}") from None
            assert msg.type == aiohttp.WSMsgType.TEXT, f"connection ended on {what}: {msg}"
            event = json.loads(msg.data)
            if event.get("event") != "error":
                continue  # media, marks, clear
            err = event["error"]
            assert err["code"] != "internal_error", f"handler crash on {what}: {err}"
            self.errors[err["code"]] += 1
            return err

    async def expect_close(self, what: str) -> None:
        while True:
            msg = await receive(self.ws, REPLY_TIMEOUT_S)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                break
            assert msg.type == aiohttp.WSMsgType.TEXT, (what, msg)
            event = json.loads(msg.data)
            assert event.get("event") != "error" or event["error"]["code"] != "internal_error", (
                event
            )
        await self.connect()

    def start_message(self, fmt: dict[str, Any] | None = None) -> dict[str, Any]:
        media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        return {
            "event": "start",
            "streamSid": SID,
            "start": {
                "streamSid": SID,
                "callSid": "CAfuzz",
                "mediaFormat": {**media_format, **(fmt or {})},
            },
        }

    async def step(self, op: Any) -> None:
        if isinstance(op, Bad):
            self.bad += 1
            await self.send(op.text)
            await self.expect_error(f"{op.what}: {op.text[:200]!r}")
        elif isinstance(op, Giant):
            self.inputs += 1
            await self.ws.send_str("x" * op.nbytes)
            await expect_close(self.ws, 1009)
            await self.ws.close()
            await self.connect()
        elif isinstance(op, TwilioStart):
            await self.send(self.start_message(op.fatal_format))
            if op.fatal_format is not None:
                err = await self.expect_error("unsupported format")
                assert err["code"] == "unsupported_media_format", err
                await self.expect_close("unsupported format")
            else:
                self.started = True
        elif isinstance(op, TwilioMedia):
            payload = base64.b64encode(b"\xff" * 160).decode()
            await self.send({"event": "media", "streamSid": SID, "media": {"payload": payload}})
            if not self.started:
                err = await self.expect_error("media before start")
                assert err["code"] == "media_before_start", err
        elif isinstance(op, TwilioStop):
            await self.send({"event": "stop", "streamSid": SID})
            await self.expect_close("stop")
        elif isinstance(op, Valid):
            await self.send(op.event)
        else:
            raise AssertionError(op)

    async def run(self, case: list[Any]) -> None:
        for op in case:
            await self.step(op)

    async def spoken_turn(self) -> int:
        """After the fuzz: a spoken question on a started stream; the loud answer samples."""
        if not self.started:
            await self.send(self.start_message())
        pcm = np.concatenate([speech(QUESTION, 8000), np.zeros(8000 * 2, np.int16)])
        data = ulaw_encode(pcm)
        for i in range(0, len(data), 160):
            payload = base64.b64encode(data[i : i + 160]).decode()
            await self.send({"event": "media", "streamSid": SID, "media": {"payload": payload}})
            await asyncio.sleep(0.005)
        loud = 0
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while True:
                msg = await self.ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                event = json.loads(msg.data)
                assert event["event"] != "error", event
                if event["event"] == "media":
                    loud += len(base64.b64decode(event["media"]["payload"]))
                if event["event"] == "mark" and event["mark"]["name"].endswith("-end"):
                    return loud


def test_twilio_frames(loop: asyncio.AbstractEventLoop, server: RunningServer) -> None:
    client = TwilioClient(server)
    loop.run_until_complete(client.open())

    first = FirstFailure()

    @fuzz_settings(600)
    @given(twilio_cases(LIMIT))
    @example(FOUND_TWILIO)
    def fuzz(case: list[Any]) -> None:
        first.run(loop, client.run(case))

    try:
        fuzz()
        loop.run_until_complete(client.step(Bad("{", "sync")))
        answer_bytes = loop.run_until_complete(client.spoken_turn())
    finally:
        loop.run_until_complete(client.close())
    COUNTS["twilio"] = client.inputs
    print(
        f"\n/twilio: {client.inputs} inputs over {client.connections} connections; "
        f"errors {dict(client.errors)}"
    )
    assert answer_bytes > 8000 * 0.3, answer_bytes
    assert sum(client.errors.values()) >= client.bad > 0, client.errors

    async def drained() -> int:
        for _ in range(50):
            if (await healthz(server))["sessions"] == 0:
                return 0
            await asyncio.sleep(0.1)
        return (await healthz(server))["sessions"]

    assert loop.run_until_complete(drained()) == 0


def test_total_inputs() -> None:
    """All four handlers together took at least 10,000 fuzz inputs (when all of them ran)."""
    if set(COUNTS) != {"realtime", "datachannel", "offer", "twilio"}:
        pytest.skip(f"only {sorted(COUNTS)} ran")
    total = sum(COUNTS.values())
    print(f"\nfuzz inputs: {dict(COUNTS)}, {total} in all")
    assert total >= MIN_TOTAL * min(1.0, SCALE), COUNTS
