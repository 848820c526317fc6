"""Protocol details that need no models, on the stand-in pipeline (``FakeRuntime``): the
reasoning stream, truncating and deleting items, the session limit and a reader that never
waits on a response.

Why these stay on the stand-in: each checks how the server maps events, not what the session
does. The reasoning events need an engine with a reasoning lane (the small real one has none);
the session limit is counted by the server before any session exists; the reader test needs a
transcript that never comes. Behaviour that lives in the Session runs on the real pipeline:
cancelling (``test_server_realtime.py``), an engine or TTS failure (``test_faults.py``).
Truncate/delete on the real Session: see the conversation-items tests."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
import websockets
from aiortc import RTCPeerConnection
from openai import AsyncOpenAI
from server_helpers import FakeRuntime, RunningServer, start_server

from realtime.config import ServerConfig
from realtime.server.app import CTX_KEY
from realtime.server.webrtc import SessionAudioTrack

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> Any:
    srv = await start_server(FakeRuntime(), ServerConfig(max_sessions=2))
    yield srv
    await srv.runner.cleanup()


async def _events_until(ws: Any, type_: str) -> list[dict[str, Any]]:
    out = []
    async with asyncio.timeout(20):
        while True:
            out.append(json.loads(await ws.recv()))
            if out[-1]["type"] == type_:
                return out


def _text_item(text: str) -> str:
    return json.dumps(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            },
        }
    )


async def test_reasoning_stream_reaches_the_sdk(server: RunningServer) -> None:
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{server.ws}/v1")
    async with client.realtime.connect(model="m") as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Why is the sky blue?"}],
            }
        )
        await conn.response.create()
        types = []
        async with asyncio.timeout(20):
            async for event in conn:
                types.append(event.type)
                if event.type == "response.done":
                    break
    assert "response.reasoning_text.delta" in types and "response.reasoning_text.done" in types
    assert types.index("response.reasoning_text.delta") < types.index(
        "response.output_audio_transcript.delta"
    )


async def test_cancel_truncate_delete(server: RunningServer) -> None:
    async with websockets.connect(f"{server.ws}/v1/realtime") as ws:
        await ws.recv()
        await ws.send(_text_item("Tell me a story."))
        created = (await _events_until(ws, "conversation.item.added"))[-1]["item"]
        await ws.send(json.dumps({"type": "response.create"}))
        await _events_until(ws, "response.output_audio.delta")
        await ws.send(json.dumps({"type": "response.cancel"}))
        events = await _events_until(ws, "response.done")
        done = events[-1]["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"]["reason"] == "client_cancelled"
        item_id = done["output"][0]["id"]
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item_id,
                    "content_index": 0,
                    "audio_end_ms": 120,
                }
            )
        )
        truncated = (await _events_until(ws, "conversation.item.truncated"))[-1]
        assert truncated["audio_end_ms"] == 120
        session = server.app[CTX_KEY].runtime.sessions[-1]
        assert session.truncated == [120]
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": created["id"]}))
        assert (await _events_until(ws, "conversation.item.deleted"))[-1]["item_id"] == created[
            "id"
        ]
        # a second response works after the cancel, and a double create is refused
        await ws.send(_text_item("And another?"))
        await ws.send(json.dumps({"type": "response.create"}))
        await ws.send(json.dumps({"type": "response.create", "event_id": "e2"}))
        events = await _events_until(ws, "response.done")
        errors = [e for e in events if e["type"] == "error"]
        assert errors and errors[0]["error"]["code"] == "conversation_already_has_active_response"
        assert events[-1]["response"]["status"] == "completed"


async def test_session_limit_applies_to_webrtc(server: RunningServer) -> None:
    holders = [await websockets.connect(f"{server.ws}/v1/realtime") for _ in range(2)]
    pc = RTCPeerConnection()
    try:
        for h in holders:
            await h.recv()
        pc.createDataChannel("events")
        pc.addTrack(SessionAudioTrack())
        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server.http}/offer", json=offer) as r:
                assert r.status == 503
                assert "full" in (await r.json())["error"]["message"]
    finally:
        await pc.close()
        for h in holders:
            await h.close()


async def test_response_create_waiting_for_a_transcript_never_blocks_the_reader(
    server: RunningServer,
) -> None:
    """A response to committed audio waits for its transcript, but beside the reader: the
    events after it are answered at once. (Fake: the reader is transport code, and the stand-in
    pipeline never sends a transcript in manual turn mode, so the wait lasts its full 30 s.)"""
    async with websockets.connect(f"{server.ws}/v1/realtime") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"turn_detection": None}}))
        await _events_until(ws, "session.updated")
        tone = (8000 * np.sin(np.arange(4800) / 3)).astype(np.int16)
        audio = base64.b64encode(tone.tobytes()).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await _events_until(ws, "input_audio_buffer.committed")
        await ws.send(json.dumps({"type": "response.create"}))
        t0 = time.monotonic()
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Hi."}}))
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        async with asyncio.timeout(1.0):
            await _events_until(ws, "session.updated")
            await _events_until(ws, "input_audio_buffer.cleared")
        # the waiting response can be cancelled, and then never starts
        await ws.send(json.dumps({"type": "response.cancel"}))
        async with asyncio.timeout(1.0):
            done = (await _events_until(ws, "response.done"))[-1]["response"]
        assert done["status"] == "cancelled"
        assert time.monotonic() - t0 < 2.0
        session = server.app[CTX_KEY].runtime.sessions[-1]
        assert session.turn == 0  # respond() was never called
