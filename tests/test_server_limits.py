"""The server's limits and admission, on every transport, each breach a clear error: message
size, the input audio buffer, session duration, idle time, sessions per key and in all,
the engine's room, and the drain that SIGTERM starts (the signal itself: test_server_shutdown).

These limits live in the server (``realtime.server.bridge``), not in the Session, so the
quick ``FakeRuntime`` stands in for the pipeline here."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from server_helpers import FakeRuntime, RunningServer, start_server

from realtime.config import ServerConfig
from realtime.engine.base import EngineBusy
from realtime.server.app import CTX_KEY
from realtime.server.webrtc import SessionAudioTrack

pytestmark = pytest.mark.asyncio

TWILIO_START = json.dumps(
    {
        "event": "start",
        "streamSid": "MZ1",
        "start": {"streamSid": "MZ1", "callSid": "CA1", "customParameters": {}},
    }
)


async def serve(**limits: Any) -> tuple[RunningServer, FakeRuntime]:
    runtime = FakeRuntime()
    return await start_server(runtime, ServerConfig(**limits)), runtime


async def recv_json(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until_error(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The next ``error`` event (Realtime or Twilio form), skipping others."""
    deadline = time.monotonic() + timeout
    while True:
        event = await recv_json(ws, max(0.1, deadline - time.monotonic()))
        if event.get("type") == "error" or event.get("event") == "error":
            return event


async def closed_with(ws: Any, timeout: float = 10.0) -> int | None:
    """Read until the server closes; its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None


async def events_until_close(ws: Any, timeout: float = 10.0) -> tuple[list[Any], int | None]:
    events = []
    try:
        while True:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except websockets.ConnectionClosed as exc:
        return events, exc.rcvd.code if exc.rcvd is not None else None


async def metrics(server: RunningServer, headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http}/metrics", headers=headers or {}) as r:
            assert r.status == 200
            return await r.text()


def append(seconds: float, rate: int = 24000) -> str:
    pcm = np.zeros(int(seconds * rate), dtype="<i2")
    return json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()}
    )


async def text_turn(ws: Any, text: str = "hello") -> str:
    """A typed question on a Realtime socket; the response's final status."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    await ws.send(json.dumps({"type": "response.create"}))
    while True:
        event = await recv_json(ws, 20)
        if event["type"] == "response.done":
            return str(event["response"]["status"])


# ---- message size --------------------------------------------------------------------------
async def test_message_size_on_every_transport() -> None:
    limit = 4096
    server, _ = await serve(max_message_bytes=limit, api_keys=["k1"])
    auth = {"Authorization": "Bearer k1"}
    try:
        # Realtime: a message over the limit is an error event and the socket lives on ...
        async with websockets.connect(f"{server.ws}/v1/realtime", additional_headers=auth) as ws:
            assert (await recv_json(ws))["type"] == "session.created"
            await ws.send(json.dumps({"type": "session.update", "pad": "x" * limit}))
            err = await until_error(ws)
            assert err["error"]["code"] == "message_too_large", err
            assert str(limit) in err["error"]["message"]
            assert await text_turn(ws) == "completed"
            # ... and one over four times the limit is refused by the WebSocket layer (1009)
            await ws.send("x" * (4 * limit + 10))
            assert await closed_with(ws) == 1009
        # Twilio: an error message, the stream goes on
        async with websockets.connect(f"{server.ws}/twilio") as tw:
            await tw.send(TWILIO_START)
            await tw.send(json.dumps({"event": "mark", "pad": "x" * limit}))
            err = await until_error(tw)
            assert err["error"]["code"] == "message_too_large", err
            await tw.send(json.dumps({"event": "dtmf", "dtmf": {"digit": "1"}}))
            await tw.send(json.dumps({"event": "bogus"}))
            assert (await until_error(tw))["error"]["code"] == "unknown_event"  # still read
        async with aiohttp.ClientSession(headers=auth) as http:
            # HTTP bodies: the offer and the client-secret request, 413 with a JSON body
            big = {"sdp": "v=0" + "x" * limit, "type": "offer"}
            async with http.post(f"{server.http}/offer", json=big) as r:
                assert r.status == 413, await r.text()
                assert "max_message_bytes" in (await r.json())["error"]["message"]
            pad = {"expires_after": {"seconds": 60}, "pad": "x" * limit}
            async with http.post(f"{server.http}/v1/realtime/client_secrets", json=pad) as r:
                assert r.status == 413, await r.text()
                assert (await r.json())["error"]["code"] == "message_too_large"

            async def chunked() -> Any:  # no Content-Length: the size is known once read
                yield b'{"pad": "'
                yield b"x" * (2 * limit)
                yield b'"}'

            async with http.post(f"{server.http}/v1/realtime/client_secrets", data=chunked()) as r:
                assert r.status == 413, await r.text()
                assert (await r.json())["error"]["code"] == "message_too_large"
            huge = b"{" + b" " * (8 * limit) + b"}"  # past aiohttp's own limit too
            async with http.post(f"{server.http}/v1/realtime/client_secrets", data=huge) as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == "message_too_large"
            async with http.post(f"{server.http}/v1/realtime/client_secrets", json={}) as r:
                assert r.status == 200 and (await r.json())["value"].startswith("ek_")
    finally:
        await server.runner.cleanup()


async def test_data_channel_message_size() -> None:
    server, _ = await serve(max_message_bytes=8192)
    peer = await webrtc_peer(server)
    try:
        await peer.opened()
        peer.channel.send("x" * 9000)
        peer.channel.send(json.dumps({"type": "text", "text": "hi"}))
        event = await peer.next_event("error")
        assert event["code"] == "message_too_large" and "8192" in event["message"], event
        assert (await peer.next_event("turn"))["transcript"] == "hi"  # the channel goes on
    finally:
        await peer.close()
        await server.runner.cleanup()


# ---- the input audio buffer ----------------------------------------------------------------
async def test_manual_turn_buffer_limit() -> None:
    server, runtime = await serve(max_input_buffer_s=1.0)
    try:
        async with websockets.connect(f"{server.ws}/v1/realtime") as ws:
            await recv_json(ws)
            update = {"type": "session.update", "session": {"type": "realtime"}}
            update["session"]["audio"] = {"input": {"turn_detection": None}}
            await ws.send(json.dumps(update))
            assert (await recv_json(ws))["type"] == "session.updated"
            await ws.send(append(0.8))
            await ws.send(append(0.3))  # 1.1 s: over
            err = await until_error(ws)
            assert err["error"]["code"] == "input_audio_buffer_full", err
            assert "max_input_buffer_s" in err["error"]["message"]
            await ws.send(append(0.15))  # still within the limit: accepted
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            event = await recv_json(ws)
            while event["type"] != "input_audio_buffer.committed":
                assert event["type"] != "error", event
                event = await recv_json(ws)
            await ws.send(append(0.8))  # a commit empties the buffer: room again
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            event = await recv_json(ws)
            while event["type"] != "input_audio_buffer.cleared":
                assert event["type"] != "error", event
                event = await recv_json(ws)
        # 0.8 + 0.15 + 0.8 s went into the session, the refused 0.3 s never did
        assert 27000 <= runtime.sessions[0].samples <= 28000, runtime.sessions[0].samples
    finally:
        await server.runner.cleanup()


# ---- session duration and idle time --------------------------------------------------------
async def test_session_duration_on_realtime_and_twilio() -> None:
    server, runtime = await serve(max_session_s=1.5, idle_timeout_s=0)
    try:
        async with (
            websockets.connect(f"{server.ws}/v1/realtime") as ws,
            websockets.connect(f"{server.ws}/twilio") as tw,
        ):
            t0 = time.monotonic()
            await recv_json(ws)
            await tw.send(TWILIO_START)
            keep_talking = asyncio.ensure_future(_keep_appending(ws))  # input does not extend it
            err = await until_error(ws)
            assert err["error"]["code"] == "session_expired", err
            assert "max_session_s" in err["error"]["message"]
            assert 1.2 < time.monotonic() - t0 < 6
            assert await closed_with(ws) == 1000
            keep_talking.cancel()
            err = await until_error(tw)
            assert err["error"]["code"] == "session_expired"
            assert await closed_with(tw) == 1000
        await asyncio.sleep(0.2)
        assert all(s.closed for s in runtime.sessions) and len(runtime.sessions) == 2
        text = await metrics(server)
        assert 'agent_sessions_ended_by_server_total{reason="session_expired"} 2.0' in text
    finally:
        await server.runner.cleanup()


async def _keep_appending(ws: Any) -> None:
    while True:
        await ws.send(append(0.1))
        await asyncio.sleep(0.1)


async def test_idle_timeout_on_realtime_and_twilio() -> None:
    server, _ = await serve(idle_timeout_s=1.0)
    try:
        async with (
            websockets.connect(f"{server.ws}/v1/realtime") as idle,
            websockets.connect(f"{server.ws}/v1/realtime") as talking,
            websockets.connect(f"{server.ws}/twilio") as tw,
        ):
            await recv_json(idle)
            await recv_json(talking)
            await tw.send(TWILIO_START)
            keep = asyncio.ensure_future(_keep_appending(talking))
            err = await until_error(idle)
            assert err["error"]["code"] == "idle_timeout", err
            assert await closed_with(idle) == 1000
            assert (await until_error(tw))["error"]["code"] == "idle_timeout"
            assert await closed_with(tw) == 1000
            await asyncio.sleep(0.5)  # 2 s after connecting: input keeps a session open
            keep.cancel()
            await talking.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert (await recv_json(talking))["type"] == "input_audio_buffer.cleared"
        text = await metrics(server)
        assert 'agent_sessions_ended_by_server_total{reason="idle_timeout"} 2.0' in text
    finally:
        await server.runner.cleanup()


async def test_a_session_busy_answering_is_not_idle() -> None:
    """A long answer to a listening client (no input meanwhile) is no idle time."""
    from realtime.server.bridge import Notice, ServerContext

    ctx = ServerContext(runtime=FakeRuntime(), config=ServerConfig(idle_timeout_s=0.5))
    live = await ctx.open_session("realtime", pace_output=False)
    ended: list[str] = []

    async def notify(notice: Notice) -> None:
        ended.append(notice.code)

    async def hangup(notice: Notice) -> None:
        await ctx.close_session(live)

    answering = asyncio.ensure_future(asyncio.sleep(1.5))
    live.session.task = answering  # the session is busy answering for 1.5 s
    live.attach(notify, hangup)
    await asyncio.sleep(1.2)
    assert ended == [] and not live.closed  # 2.4 idle timeouts, all of it answering
    await answering
    await asyncio.sleep(0.9)
    assert ended == ["idle_timeout"] and live.closed and ctx.active == 0


class Peer:
    """A browser stand-in: an aiortc peer with a microphone track and the events channel."""

    def __init__(self, pc: RTCPeerConnection, mic: SessionAudioTrack) -> None:
        self.pc, self.mic = pc, mic
        self.channel = pc.createDataChannel("events")
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.channel.on("message", lambda m: self.events.put_nowait(json.loads(m)))
        self._open = asyncio.Event()
        self.channel.on("open", self._open.set)

    async def opened(self, timeout: float = 20) -> None:
        await asyncio.wait_for(self._open.wait(), timeout)

    async def next_event(self, kind: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.1, deadline - time.monotonic()))
            if event["event"] == kind:
                return event

    async def close(self) -> None:
        await self.pc.close()


async def webrtc_peer(
    server: RunningServer, headers: dict[str, str] | None = None, expect: int = 200
) -> Any:
    pc = RTCPeerConnection()
    mic = SessionAudioTrack()
    peer = Peer(pc, mic)
    pc.addTrack(mic)
    await pc.setLocalDescription(await pc.createOffer())
    body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
    async with aiohttp.ClientSession(headers=headers or {}) as http:
        async with http.post(f"{server.http}/offer", json=body) as r:
            assert r.status == expect, await r.text()
            answer = await r.json()
    if expect != 200:
        await pc.close()
        return answer
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    return peer


async def test_webrtc_session_duration_and_idle_timeout() -> None:
    server, runtime = await serve(max_session_s=4.0, idle_timeout_s=1.5)
    talking = await webrtc_peer(server)  # its microphone sends (silent) packets all along
    quiet = await webrtc_peer(server)
    try:
        await talking.opened()
        await quiet.opened()
        quiet.mic.stop()  # no more packets: idle
        event = await quiet.next_event("error", timeout=10)
        assert event["code"] == "idle_timeout", event
        event = await talking.next_event("error", timeout=10)
        assert event["code"] == "session_expired", event
        for _ in range(100):
            if talking.pc.connectionState in ("closed", "failed") and len(runtime.sessions) == 2:
                if all(s.closed for s in runtime.sessions):
                    break
            await asyncio.sleep(0.1)
        assert all(s.closed for s in runtime.sessions), "the server kept a session open"
    finally:
        await talking.close()
        await quiet.close()
        await server.runner.cleanup()


# ---- admission: sessions per key, max_sessions, the engine's room --------------------------
async def test_sessions_per_key_counts_its_client_secrets() -> None:
    server, _ = await serve(api_keys=["k1", "k2"], max_sessions_per_key=1, max_sessions=8)
    k1 = {"Authorization": "Bearer k1"}
    try:
        async with aiohttp.ClientSession(headers=k1) as http:
            async with http.post(f"{server.http}/v1/realtime/client_secrets") as r:
                secret = (await r.json())["value"]
        async with websockets.connect(f"{server.ws}/v1/realtime", additional_headers=k1) as first:
            assert (await recv_json(first))["type"] == "session.created"
            for headers in (k1, {"Authorization": f"Bearer {secret}"}):  # the key, its secret
                async with websockets.connect(
                    f"{server.ws}/v1/realtime", additional_headers=headers
                ) as extra:
                    err = await recv_json(extra)
                    assert err["type"] == "error", err
                    assert err["error"]["code"] == "key_session_limit_reached"
                    assert "max_sessions_per_key" in err["error"]["message"]
                    assert await closed_with(extra) == 1013
            answer = await webrtc_peer(server, k1, expect=429)
            assert answer["error"]["code"] == "key_session_limit_reached"
            async with websockets.connect(
                f"{server.ws}/v1/realtime", additional_headers={"Authorization": "Bearer k2"}
            ) as other:  # another key is not held back
                assert (await recv_json(other))["type"] == "session.created"
            assert await text_turn(first) == "completed"  # the first caller goes on
        await asyncio.sleep(0.2)
        async with websockets.connect(f"{server.ws}/v1/realtime", additional_headers=k1) as again:
            assert (await recv_json(again))["type"] == "session.created"  # the slot came back
        text = await metrics(server, k1)
        assert 'agent_sessions_rejected_total{reason="key_limit"} 3.0' in text
    finally:
        await server.runner.cleanup()


async def test_full_server_refuses_newcomers_on_every_transport() -> None:
    server, _ = await serve(max_sessions=2)
    try:
        async with (
            websockets.connect(f"{server.ws}/v1/realtime") as a,
            websockets.connect(f"{server.ws}/twilio") as b,
        ):
            await recv_json(a)
            await b.send(TWILIO_START)
            async with websockets.connect(f"{server.ws}/v1/realtime") as c:
                err = await recv_json(c)
                assert err["type"] == "error"
                assert err["error"]["code"] == "session_limit_reached", err
                assert await closed_with(c) == 1013
            async with websockets.connect(f"{server.ws}/twilio") as d:
                assert (await recv_json(d))["error"]["code"] == "session_limit_reached"
                assert await closed_with(d) == 1013  # a hang-up
            answer = await webrtc_peer(server, expect=503)
            assert answer["error"]["code"] == "session_limit_reached"
            assert await text_turn(a) == "completed"  # callers already in keep going
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{server.http}/healthz") as r:
                    assert (await r.json())["sessions"] == 2
        text = await metrics(server)
        assert 'agent_sessions_rejected_total{reason="max_sessions"} 3.0' in text
    finally:
        await server.runner.cleanup()


class BusyRuntime(FakeRuntime):
    """A runtime whose engine has room for ``room`` sessions (``EngineBusy`` after that), and
    reports it as ``capacity_stats`` the way the real engines do."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.engine = self
        self.room = room

    def new_session(self, options: Any = None, pace_output: bool = True) -> Any:
        session = super().new_session(options, pace_output)
        start = session.start

        async def start_or_busy() -> None:
            if sum(not s.closed for s in self.sessions) >= self.room:
                raise EngineBusy("all 1 cache slots of the engine are taken")
            await start()

        session.start = start_or_busy  # type: ignore[method-assign]
        return session

    def capacity_stats(self) -> dict[str, int]:
        used = sum(not s.closed for s in self.sessions)
        return {"kv_slots_total": self.room, "kv_slots_used": used, "lanes_in_use": 0}


async def test_engine_busy_is_a_busy_answer_and_metrics_show_the_engine() -> None:
    runtime = BusyRuntime(room=1)
    server = await start_server(runtime, ServerConfig(max_sessions=8))
    try:
        async with websockets.connect(f"{server.ws}/v1/realtime") as a:
            await recv_json(a)
            async with websockets.connect(f"{server.ws}/v1/realtime") as b:
                err = await recv_json(b)
                assert err["error"]["code"] == "server_busy", err
                assert "busy" in err["error"]["message"]
            answer = await webrtc_peer(server, expect=503)
            assert answer["error"]["code"] == "server_busy"
            text = await metrics(server)
            assert 'agent_engine{stat="kv_slots_used"} 1.0' in text
            assert 'agent_engine{stat="kv_slots_total"} 1.0' in text
            assert 'agent_sessions_active{transport="realtime"} 1.0' in text
            assert 'agent_sessions_rejected_total{reason="engine_busy"} 2.0' in text
            assert await text_turn(a) == "completed"
    finally:
        await server.runner.cleanup()


# ---- drain ---------------------------------------------------------------------------------
async def test_drain_tells_every_session_then_closes_and_refuses_newcomers() -> None:
    server, runtime = await serve(max_sessions=8)
    ctx = server.app[CTX_KEY]
    peer = await webrtc_peer(server)
    try:
        async with (
            websockets.connect(f"{server.ws}/v1/realtime") as rt,
            websockets.connect(f"{server.ws}/twilio") as tw,
        ):
            await recv_json(rt)
            await tw.send(TWILIO_START)
            await peer.opened()
            item = {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "x"}],
            }
            await rt.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await rt.send(json.dumps({"type": "response.create"}))
            while (await recv_json(rt))["type"] != "response.output_audio.delta":
                pass
            drain = asyncio.ensure_future(ctx.drain(5.0))
            await asyncio.sleep(0.05)
            async with websockets.connect(f"{server.ws}/v1/realtime") as late:
                err = await recv_json(late)
                assert err["error"]["code"] == "server_shutting_down", err
                assert await closed_with(late) == 1013
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{server.http}/healthz") as r:
                    assert r.status == 503 and (await r.json())["status"] == "draining"
            # the close notice, then the answer in flight ends (completed: it had time), then
            # the hang-up
            events, code = await events_until_close(rt)
            assert code == 1001
            errors = [e["error"]["code"] for e in events if e["type"] == "error"]
            assert errors == ["server_shutting_down"], events
            done = [e["response"]["status"] for e in events if e["type"] == "response.done"]
            assert done == ["completed"], [e["type"] for e in events]
            assert (await until_error(tw))["error"]["code"] == "server_shutting_down"
            assert await closed_with(tw) == 1001
            assert (await peer.next_event("error"))["code"] == "server_shutting_down"
            await asyncio.wait_for(drain, 10)
        assert not ctx.live and ctx.active == 0
        assert all(s.closed for s in runtime.sessions) and len(runtime.sessions) == 3
    finally:
        await peer.close()
        await server.runner.cleanup()


async def test_server_cleanup_waits_for_sessions_still_closing() -> None:
    """A client hangs up and its session's close is slow (the engine is busy): the server
    stopping meanwhile must not leave that session half closed (its handler is orphaned once the
    peer is gone; the loop may end right after)."""
    server, runtime = await serve()
    ctx = server.app[CTX_KEY]
    gate = asyncio.Event()
    try:
        ws = await websockets.connect(f"{server.ws}/v1/realtime")
        await recv_json(ws)
        (session,) = runtime.sessions
        close = session.close

        async def slow_close() -> None:
            await gate.wait()
            await close()

        session.close = slow_close  # type: ignore[method-assign]
        ws.transport.abort()  # the caller is gone at once
        async with asyncio.timeout(10):
            while ctx.active:  # its handler is closing it
                await asyncio.sleep(0.01)
        cleanup = asyncio.ensure_future(server.runner.cleanup())
        await asyncio.sleep(0.3)
        assert not cleanup.done() and not session.closed  # it waits for the close
        gate.set()
        await asyncio.wait_for(cleanup, 10)
        assert session.closed
    finally:
        gate.set()
        await server.runner.cleanup()


# ---- a turn longer than vad.max_turn_s (the Session's own limit) ---------------------------
async def test_a_turn_past_max_turn_s_is_cut_with_an_error_and_answered(runtime: Any) -> None:
    from server_helpers import speech

    from realtime.context import SessionOptions
    from realtime.frames import ErrorFrame, SpeechStarted, SpeechStopped, Transcript, TurnMetrics

    vad = dataclasses.replace(runtime.config.vad, max_turn_s=1.2)
    session = runtime.new_session(SessionOptions(vad=vad), pace_output=False)
    await session.start()
    frames: list[Any] = []
    try:
        long_turn = speech("Tell me everything you know about the weather in the mountains")
        for i in range(0, len(long_turn), 1600):
            await session.push_audio(long_turn[i : i + 1600], 16000)
        await session.push_audio(np.zeros(16000, np.int16), 16000)
        async with asyncio.timeout(120):
            async for frame in session.frames():
                frames.append(frame)
                if isinstance(frame, TurnMetrics):
                    break
    finally:
        await session.close()
    kinds = [type(f).__name__ for f in frames]
    cut = next(i for i, f in enumerate(frames) if isinstance(f, ErrorFrame))
    assert frames[cut].code == "turn_too_long" and "max_turn_s" in frames[cut].message
    assert not frames[cut].fatal
    stop = next(i for i, f in enumerate(frames) if isinstance(f, SpeechStopped))
    assert cut < stop, kinds
    started = next(f for f in frames if isinstance(f, SpeechStarted))
    assert frames[stop].t_decided - started.t < 1.2 + 0.1  # cut at the limit, mid-sentence
    assert len(long_turn) / 16000 > 3.0
    finals = [f.text for f in frames if isinstance(f, Transcript) and f.final]
    assert finals and finals[0].strip(), kinds  # what was heard up to the cut is answered
