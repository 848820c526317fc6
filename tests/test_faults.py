"""Faults, one test each, on the real pipeline (the shared offline runtime; a tiny Step-Audio
engine for the full cache): a client that vanishes mid-answer, a client that stops reading
(/v1/realtime and /twilio), an engine that raises, a synthesiser that fails, and an engine with
no free cache slot. In every case the session ends cleanly or recovers, what it held (tasks,
threads, cache slots, peer connections) is freed within a second (``tests/leaks.py``), and a
second session that runs beside it finishes its own turn."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import websockets
from leaks import assert_no_leaks, snapshot
from server_helpers import RunningServer, speech, start_server

from realtime.config import ServerConfig
from realtime.server.app import CTX_KEY
from tts.stream import TextStream

pytestmark = pytest.mark.asyncio(loop_scope="module")

STORY = "Tell me a long story about a brave little dragon who learns to fly."
SID = "MZfault"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(runtime: Any) -> Any:
    srv = await start_server(runtime, ServerConfig(max_sessions=4, max_output_queue_s=1.0))
    # Small kernel send buffers, as on a slow link (accepted sockets inherit the listener's):
    # a client that stops reading then holds up the server after ~100 kB, not megabytes.
    for site in srv.runner.sites:
        for sock in site._server.sockets:  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    yield srv
    await srv.runner.cleanup()
    assert not runtime.sessions, f"{len(runtime.sessions)} session(s) left open"


# ---- helpers ---------------------------------------------------------------------------------
async def connect(server: RunningServer, path: str = "/v1/realtime", **kw: Any) -> Any:
    ws = await websockets.connect(f"{server.ws}{path}", max_size=None, ping_interval=None, **kw)
    if path == "/v1/realtime":
        assert json.loads(await ws.recv())["type"] == "session.created"
    return ws


async def new_session(runtime: Any, open_: Callable[[], Any]) -> tuple[Any, Any]:
    """Open a connection with ``open_`` and return it with the Session the server made for it."""
    known = set(runtime.sessions)
    ws = await open_()
    for _ in range(100):
        fresh = set(runtime.sessions) - known
        if fresh:
            return ws, fresh.pop()
        await asyncio.sleep(0.02)
    raise AssertionError("the server made no session")


async def ask(ws: Any, text: str) -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    await ws.send(json.dumps({"type": "response.create"}))


async def events_until(ws: Any, type_: str, timeout: float = 120) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            out.append(json.loads(await ws.recv()))
            if out[-1]["type"] == type_:
                return out


async def completes(ws: Any, text: str = "What is the capital of France?") -> None:
    """``ws`` asks ``text`` and gets a whole spoken answer."""
    await ask(ws, text)
    events = await events_until(ws, "response.done")
    assert events[-1]["response"]["status"] == "completed", events[-1]
    assert any(e["type"] == "response.output_audio.delta" for e in events)


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``check()`` holds (fails after ``timeout``)."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def settled(runtime: Any, before: Any) -> None:
    """Nothing is left a second after the shared engine thread has run the jobs queued on it
    (the sessions' closes among them: on a busy 2-core machine a turn's engine commit queued
    before a close takes seconds, and the close waits its turn)."""
    await runtime.worker.call(lambda: None)
    await assert_no_leaks(before)


def ended(session: Any) -> bool:
    """The session is closed and holds nothing: no tasks, no engine state."""
    return session._closed and len(session.ctx.tasks) == 0 and session.engine.session is None


def stalled_socket(server: RunningServer) -> socket.socket:
    """A connected socket with a tiny receive buffer: a client that stops reading fills it
    (and the server's send buffer) after a few kB, not megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    return sock


# ---- a client vanishing mid-answer -------------------------------------------------------------
async def test_a_client_vanishing_mid_answer(server: RunningServer, runtime: Any) -> None:
    before = snapshot(runtime)
    other = await connect(server)
    leaver, session = await new_session(runtime, lambda: connect(server))
    await ask(leaver, STORY)
    other_turn = asyncio.ensure_future(completes(other))
    await events_until(leaver, "response.output_audio.delta")
    leaver.transport.abort()  # gone: no close frame, no FIN
    await until(lambda: ended(session), 1.0, "the vanished client's session ended")
    await other_turn  # the other caller noticed nothing
    await other.close()
    await settled(runtime, before)


async def test_a_webrtc_peer_leaving_mid_answer(server: RunningServer, runtime: Any) -> None:
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from realtime.server.webrtc import SessionAudioTrack

    before = snapshot(runtime)
    other = await connect(server)
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("events")
    pc.addTrack(SessionAudioTrack())  # a silent microphone
    answering = asyncio.Event()

    @channel.on("open")
    def on_open() -> None:
        channel.send(json.dumps({"type": "text", "text": STORY}))

    @channel.on("message")
    def on_message(message: str) -> None:
        if json.loads(message)["event"] == "answer":
            answering.set()

    async def offer() -> None:
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.http}/offer", json=body) as r:
                assert r.status == 200, await r.text()
                await pc.setRemoteDescription(RTCSessionDescription(**await r.json()))

    _, session = await new_session(runtime, offer)
    other_turn = asyncio.ensure_future(completes(other))
    await asyncio.wait_for(answering.wait(), 120)
    await pc.close()  # the page is closed mid-answer
    await until(lambda: ended(session), 1.0, "the peer's session ended")
    await other_turn
    await other.close()
    await settled(runtime, before)  # the server's peer connection is closed too


# ---- a network stall: a client that stops reading ----------------------------------------------
async def test_a_realtime_client_that_stops_reading_is_dropped(
    server: RunningServer, runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    before = snapshot(runtime)
    other = await connect(server)
    stalled, session = await new_session(
        runtime, lambda: connect(server, sock=stalled_socket(server), max_queue=1)
    )

    async def keep_asking() -> None:  # and never reads again
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await ask(stalled, STORY)  # refused while an answer runs: asked again after
                await asyncio.sleep(2)

    asking = asyncio.ensure_future(keep_asking())
    other_turn = asyncio.ensure_future(completes(other))
    with caplog.at_level(logging.WARNING, logger="realtime.server.bridge"):
        await until(lambda: session._closed, 240, "the stalled client was dropped")
        await until(lambda: ended(session), 1.0, "its session ended")
    asking.cancel()
    assert any("not reading" in r.getMessage() for r in caplog.records)
    await other_turn
    await other.close()
    await settled(runtime, before)
    # what the client still gets, reading again: the answer's start, then the connection ends
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(10):
            while True:
                await stalled.recv()
    metrics = server.app[CTX_KEY].metrics.client_errors
    assert metrics.labels("realtime", "output_queue_full")._value.get() >= 1


async def test_a_twilio_stream_that_stops_reading_is_dropped(
    server: RunningServer, runtime: Any
) -> None:
    before = snapshot(runtime)
    other = await connect(server)
    call, session = await new_session(
        runtime,
        lambda: connect(server, "/twilio", sock=stalled_socket(server), max_queue=1),
    )
    start = {
        "streamSid": SID,
        "accountSid": "AC1",
        "callSid": "CAfault",
        "tracks": ["inbound"],
        "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    await call.send(json.dumps({"event": "start", "streamSid": SID, "start": start}))
    from realtime.server.codecs import ulaw_encode

    # a question, then silence long enough for its whole answer (speaking again sooner would
    # barge in and cut the answer short)
    question = np.concatenate([speech(STORY, 8000), np.zeros(8000 * 25, np.int16)])
    data = ulaw_encode(question)

    async def keep_talking() -> None:  # the caller asks again and again, hearing nothing
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                for i in range(0, len(data), 160):
                    payload = base64.b64encode(data[i : i + 160]).decode()
                    media = {"event": "media", "streamSid": SID, "media": {"payload": payload}}
                    await call.send(json.dumps(media))
                    await asyncio.sleep(0.02)  # in real time, as a phone line does

    talking = asyncio.ensure_future(keep_talking())
    other_turn = asyncio.ensure_future(completes(other))
    await until(lambda: session._closed, 240, "the stalled Twilio stream was dropped")
    await until(lambda: ended(session), 1.0, "its session ended")
    talking.cancel()
    await other_turn
    await other.close()
    await settled(runtime, before)
    call.transport.abort()


# ---- an engine exception -----------------------------------------------------------------------
async def test_an_engine_exception_fails_the_answer_and_the_session_goes_on(
    server: RunningServer, runtime: Any
) -> None:
    before = snapshot(runtime)
    other = await connect(server)
    ws, session = await new_session(runtime, lambda: connect(server))
    es = session.engine.session
    real = es.respond

    def broken(turn: Any, cancel: Any) -> Any:  # a generator, like the real one
        es.respond = real  # once: the next turn gets the real engine again
        raise RuntimeError("injected: CUDA error: an illegal memory access was encountered")
        yield  # pragma: no cover

    es.respond = broken
    other_turn = asyncio.ensure_future(completes(other))
    await ask(ws, "Hello?")
    events = await events_until(ws, "response.done")
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert errors and errors[0]["code"] == "engine_error", events
    assert "illegal memory access" in errors[0]["message"]
    assert events[-1]["response"]["status"] == "failed"
    await other_turn
    await completes(ws)  # the same session answers the next turn
    await ws.close()
    await other.close()
    await settled(runtime, before)


# ---- a TTS failure -----------------------------------------------------------------------------
class _BrokenVoice:
    """The session's TTS head with a synthesiser that fails (a voice file gone, a crashed
    runtime): the real streaming machinery around it."""

    def __init__(self, head: Any) -> None:
        self.head = head

    def open_stream(self, voice: Any = None, speaking_rate: Any = None, output_rate: Any = None):
        def synth(text: str) -> np.ndarray:
            raise RuntimeError("injected: the voice model file is unreadable")

        return TextStream(synth, self.head.sample_rate, output_rate=output_rate, name="broken")


async def test_a_tts_failure_fails_the_answer_with_an_error(
    server: RunningServer, runtime: Any
) -> None:
    before = snapshot(runtime)
    other = await connect(server)
    ws, session = await new_session(runtime, lambda: connect(server))
    session.speaker.tts = _BrokenVoice(runtime.tts)
    other_turn = asyncio.ensure_future(completes(other))
    await ask(ws, "Hello?")
    events = await events_until(ws, "response.done")
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert errors and errors[0]["code"] == "tts_error", events
    assert "voice model file" in errors[0]["message"]
    assert events[-1]["response"]["status"] == "failed"  # not "completed" with no sound
    assert not any(e["type"] == "response.output_audio.delta" for e in events)
    await other_turn
    session.speaker.tts = runtime.tts  # the voice is back: the session answers again
    await completes(ws)
    await ws.close()
    await other.close()
    await settled(runtime, before)


# ---- a full cache ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_step_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from step_audio_fixtures import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


async def test_a_full_cache_is_a_clear_error_and_a_closed_session_frees_its_slot(
    tiny_step_audio: Path,
) -> None:
    from realtime.config import load_config
    from realtime.runtime import Runtime

    cfg = load_config(
        "step-audio-r1",
        {
            "engine.model": str(tiny_step_audio),
            "engine.device": "cpu",
            "engine.dtype": "float32",
            "engine.max_batch": 1,
            "engine.max_context": 512,
            "tts.backend": "espeak",
        },
    )
    rt = await Runtime.create(cfg, warmup=False)
    srv = await start_server(rt, ServerConfig(max_sessions=4))
    try:
        before = snapshot(rt)
        assert before.free_slots == 1
        first, session = await new_session(rt, lambda: connect(srv))
        assert rt.engine.cache.free_slots == 0
        async with websockets.connect(f"{srv.ws}/v1/realtime") as second:
            event = json.loads(await asyncio.wait_for(second.recv(), 30))
            assert event["type"] == "error", event
            assert event["error"]["code"] == "server_busy"
            assert "busy" in event["error"]["message"] and "cache" in event["error"]["message"]
        # the first session noticed nothing: it still answers its client
        await first.send(json.dumps({"type": "session.update", "session": {"instructions": "Hi"}}))
        await events_until(first, "session.updated", 10)
        first.transport.abort()
        took = await until(lambda: rt.engine.cache.free_slots == 1, 1.0, "the slot is free")
        assert ended(session), took
        await settled(rt, before)
        again = await connect(srv)  # and a new caller gets it
        await again.close()
    finally:
        await srv.runner.cleanup()
        await rt.close()
