"""WebRTC at POST /offer: an aiortc peer sends a spoken question as its microphone track and
gets spoken audio and the events (data channel) back; malformed offers get a clear 4xx."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from server_helpers import QUESTION, RunningServer, speech, start_server

from realtime.audio import av_frame_to_array
from realtime.config import ServerConfig
from realtime.server.webrtc import SessionAudioTrack

pytestmark = pytest.mark.asyncio(loop_scope="module")
LIMIT = 64 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    srv = await start_server(server_runtime, ServerConfig(max_message_bytes=LIMIT))
    yield srv
    await srv.runner.cleanup()


async def test_spoken_question_gets_spoken_answer_and_events(server: RunningServer) -> None:
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("events")
    mic = SessionAudioTrack()  # plays what it is fed, then silence, in real time
    mic.feed(speech(QUESTION, 48000))
    pc.addTrack(mic)
    events: list[dict[str, Any]] = []
    got_turn = asyncio.Event()
    loud_samples = [0]

    @channel.on("message")
    def on_message(message: str) -> None:
        event = json.loads(message)
        events.append(event)
        if event["event"] == "turn":
            got_turn.set()

    async def read_audio(track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pcm = av_frame_to_array(frame).astype(np.float64)
            if pcm.ndim == 2:
                pcm = pcm.mean(axis=1)
            loud_samples[0] += int(np.sum(np.abs(pcm) > 1000))

    readers: list[asyncio.Task[None]] = []

    @pc.on("track")
    def on_track(track: Any) -> None:
        readers.append(asyncio.ensure_future(read_audio(track)))

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        async with http.post(f"{server.http}/offer", json=body) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    try:
        await asyncio.wait_for(got_turn.wait(), 120)
        await asyncio.sleep(0.5)
        kinds = [e["event"] for e in events]
        assert "speech_started" in kinds and "speech_stopped" in kinds, kinds
        finals = [e["text"] for e in events if e["event"] == "transcript" and e["final"]]
        assert finals and "capital" in finals[-1].lower(), finals
        assert "".join(e["text"] for e in events if e["event"] == "answer").strip()
        turn = next(e for e in events if e["event"] == "turn")
        assert turn["first_packet_s"] is not None
        assert loud_samples[0] > 48000 * 0.3, loud_samples  # > 0.3 s of non-silent answer audio
        # commands on the data channel: a typed question is answered; a bad one is an error
        got_turn.clear()
        channel.send(json.dumps({"type": "text", "text": "What is two plus two?"}))
        channel.send("{not json")
        await asyncio.wait_for(got_turn.wait(), 120)
        turns = [e for e in events if e["event"] == "turn"]
        assert len(turns) == 2 and turns[-1]["transcript"] == "What is two plus two?"
        assert any(e["event"] == "error" and e["code"] == "bad_command" for e in events)
    finally:
        for t in readers:
            t.cancel()
        await pc.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http}/metrics") as r:
            assert 'agent_turns_total{transport="webrtc"}' in await r.text()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"this is not json", 400, "must be JSON"),
        (json.dumps({"sdp": 5, "type": "offer"}).encode(), 400, "JSON object"),
        (json.dumps({"sdp": "v=0\r\n", "type": "answer"}).encode(), 400, '"type" must be "offer"'),
        (json.dumps({"sdp": "hello", "type": "offer"}).encode(), 400, "start with v=0"),
        (json.dumps({"sdp": "v=0\r\ns=-\r\n", "type": "offer"}).encode(), 400, "no audio"),
        (
            json.dumps({"sdp": "v=0\r\nm=audio banana\r\na=garbage", "type": "offer"}).encode(),
            400,
            "invalid SDP offer",
        ),
        (json.dumps({"sdp": "v=0" + "x" * LIMIT, "type": "offer"}).encode(), 413, "larger"),
    ],
)
async def test_bad_offers(server: RunningServer, body: bytes, status: int, needle: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.http}/offer", data=body) as r:
            assert r.status == status
            message = (await r.json())["error"]["message"]
            assert needle in message, message
        async with http.get(f"{server.http}/healthz") as r:
            assert r.status == 200
            assert (await r.json())["sessions"] == 0
