"""Twilio Media Streams at /twilio: a client speaking Twilio's message format streams 8 kHz
mu-law, gets mu-law media and marks back, and a barge-in produces ``clear`` (pacing and
backchannels: test_twilio_pacing.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import websockets
from server_helpers import QUESTION, RunningServer, rms, speech, start_server

from bench.twilio_caller import SID, start_event
from realtime.config import ServerConfig
from realtime.server.codecs import ulaw_decode, ulaw_encode

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    srv = await start_server(server_runtime, ServerConfig())
    yield srv
    await srv.runner.cleanup()


def start_message(encoding: str = "audio/x-mulaw", rate: int = 8000) -> str:
    return json.dumps(start_event(encoding, rate))


async def stream_audio(ws: Any, pcm: np.ndarray, seq: list[int]) -> None:
    """Send ``pcm`` (8 kHz int16) as 20 ms media messages, a little faster than real time."""
    data = ulaw_encode(pcm)
    for i in range(0, len(data), 160):
        seq[0] += 1
        await ws.send(
            json.dumps(
                {
                    "event": "media",
                    "sequenceNumber": str(seq[0]),
                    "streamSid": SID,
                    "media": {
                        "track": "inbound",
                        "chunk": str(seq[0]),
                        "timestamp": str(seq[0] * 20),
                        "payload": base64.b64encode(data[i : i + 160]).decode(),
                    },
                }
            )
        )
        if seq[0] % 10 == 0:
            await asyncio.sleep(0.05)


async def test_call_answer_marks_and_barge_in(server: RunningServer) -> None:
    question = np.concatenate([speech(QUESTION, 8000), np.zeros(8000, dtype=np.int16)])
    seq = [1]
    async with websockets.connect(f"{server.ws}/twilio") as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(start_message())
        sender = asyncio.ensure_future(stream_audio(ws, question, seq))
        audio = bytearray()
        marks: list[str] = []
        async with asyncio.timeout(120):
            while not any(m.endswith("-end") for m in marks):
                msg = json.loads(await ws.recv())
                assert msg["event"] in ("media", "mark"), msg
                assert msg["streamSid"] == SID
                if msg["event"] == "media":
                    payload = base64.b64decode(msg["media"]["payload"])
                    assert len(payload) == 160  # 20 ms frames
                    audio.extend(payload)
                else:
                    marks.append(msg["mark"]["name"])
                    # Twilio echoes a mark once the audio before it has played
                    await ws.send(
                        json.dumps(
                            {
                                "event": "mark",
                                "streamSid": SID,
                                "mark": {"name": msg["mark"]["name"]},
                            }
                        )
                    )
        await sender
        pcm = ulaw_decode(bytes(audio))
        assert len(pcm) > 8000 * 0.3 and rms(pcm) > 300

        # Second question; while its answer is being sent (in real time), talk over it: the
        # turn controller judges "Wait, stop." an interruption, and Twilio's queue is cleared.
        await stream_audio(ws, question, seq)
        async with asyncio.timeout(120):
            while json.loads(await ws.recv())["event"] != "media":
                pass
        barge = asyncio.ensure_future(stream_audio(ws, speech("Wait, stop.", 8000), seq))
        async with asyncio.timeout(60):
            while True:
                msg = json.loads(await ws.recv())
                if msg["event"] == "clear":
                    assert msg["streamSid"] == SID
                    break
        await barge
        await ws.send(
            json.dumps(
                {
                    "event": "dtmf",
                    "streamSid": SID,
                    "dtmf": {"track": "inbound_track", "digit": "5"},
                }
            )
        )
        await ws.send(json.dumps({"event": "stop", "streamSid": SID, "stop": {"callSid": "CA1"}}))


async def _error(ws: Any, message: str) -> dict[str, Any]:
    await ws.send(message)
    async with asyncio.timeout(10):
        while True:
            msg = json.loads(await ws.recv())
            if msg["event"] == "error":
                return msg["error"]


async def test_bad_messages(server: RunningServer) -> None:
    async with websockets.connect(f"{server.ws}/twilio") as ws:
        media = json.dumps({"event": "media", "streamSid": SID, "media": {"payload": "//8="}})
        assert (await _error(ws, media))["code"] == "media_before_start"
        assert (await _error(ws, "nope{"))["code"] == "invalid_json"
        assert (await _error(ws, json.dumps({"event": "wat"})))["code"] == "unknown_event"
        await ws.send(start_message())
        bad = json.dumps({"event": "media", "streamSid": SID, "media": {"payload": "***"}})
        assert (await _error(ws, bad))["code"] == "invalid_audio"
    async with websockets.connect(f"{server.ws}/twilio") as ws:
        err = await _error(ws, start_message("audio/x-l16", 16000))
        assert err["code"] == "unsupported_media_format"
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(5):
                await ws.recv()
    async with websockets.connect(f"{server.ws}/twilio") as ws:  # the server goes on
        await ws.send(start_message())
        assert (await _error(ws, json.dumps({"event": "wat"})))["code"] == "unknown_event"
