"""The OpenAI-Realtime-compatible WebSocket API, driven by the official ``openai`` SDK and by
a raw ``websockets`` client for bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import websockets
from openai import AsyncOpenAI
from server_helpers import QUESTION, RunningServer, rms, speech, start_server

from realtime.config import ServerConfig
from realtime.server.codecs import ulaw_decode, ulaw_encode

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMIT = 256 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    srv = await start_server(server_runtime, ServerConfig(max_message_bytes=LIMIT, max_sessions=3))
    yield srv
    await srv.runner.cleanup()


def chunks(pcm: np.ndarray, n: int) -> list[np.ndarray]:
    return [pcm[i : i + n] for i in range(0, len(pcm), n)]


async def test_sdk_whole_turn_manual_commit(server: RunningServer) -> None:
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{server.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        first = await conn.recv()
        assert first.type == "session.created"
        await conn.session.update(
            session={
                "type": "realtime",
                "instructions": "You are a terse voice assistant. Answer in one short sentence.",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": None,
                    },
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"},
                },
            }
        )
        updated = await conn.recv()
        assert updated.type == "session.updated", updated
        assert updated.session.audio.input.turn_detection is None
        assert updated.session.instructions.startswith("You are a terse voice assistant")
        pcm = speech(QUESTION, 24000)
        for piece in chunks(pcm, 2400):
            await conn.input_audio_buffer.append(audio=base64.b64encode(piece.tobytes()).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        t_commit = time.monotonic()
        types: list[str] = []
        audio = bytearray()
        transcript = answer = ""
        done = None
        async with asyncio.timeout(120):
            async for event in conn:
                types.append(event.type)
                if event.type == "response.output_audio.delta":
                    audio.extend(base64.b64decode(event.delta))
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    transcript = event.transcript
                elif event.type == "response.output_audio_transcript.done":
                    answer = event.transcript
                elif event.type == "error":
                    pytest.fail(f"error event: {event}")
                elif event.type == "response.created":
                    assert time.monotonic() - t_commit < 15  # no waiting on a lost transcript
                elif event.type == "response.done":
                    done = event
                    break
        for expected in (
            "input_audio_buffer.committed",
            "conversation.item.added",
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_audio.done",
        ):
            assert expected in types, (expected, types)
        assert done is not None and done.response.status == "completed"
        assert types.count("input_audio_buffer.committed") == 1, types
        assert "input_audio_buffer.speech_stopped" not in types  # manual turns: no VAD events
        usage = done.response.usage
        assert usage is not None and usage.total_tokens > 0
        # the engine's own counts: the first turn pre-fills the system prompt and the chat
        # template around the question, far more tokens than the question has words
        assert usage.input_token_details.text_tokens > 2 * len(transcript.split()), usage
        assert usage.output_token_details.text_tokens >= len(answer.split()) // 2, usage
        assert usage.input_token_details.audio_tokens > 20  # about 2 s of speech at 50 ms
        words = transcript.lower()
        assert "capital" in words and "france" in words, transcript
        assert answer.strip()
        out = np.frombuffer(bytes(audio), dtype=np.int16)
        assert len(out) > 24000 * 0.3 and rms(out) > 300, (len(out), rms(out))


async def test_sdk_server_vad_turn(server: RunningServer) -> None:
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{server.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        assert (await conn.recv()).type == "session.created"
        pcm = np.concatenate([speech(QUESTION, 24000), np.zeros(24000, dtype=np.int16)])
        for piece in chunks(pcm, 2400):
            await conn.input_audio_buffer.append(audio=base64.b64encode(piece.tobytes()).decode())
        types: list[str] = []
        async with asyncio.timeout(120):
            async for event in conn:
                types.append(event.type)
                if event.type == "response.done":
                    assert event.response.status == "completed"
                    break
        order = [t for t in types if t.startswith("input_audio_buffer.")]
        assert order[:3] == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
        ], types
        assert "response.output_audio.delta" in types


async def _recv_until(ws: Any, type_: str, timeout: float = 60) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == type_:
                return event


async def _expect_error(ws: Any, message: str, code: str) -> dict[str, Any]:
    await ws.send(message)
    event = await _recv_until(ws, "error", 10)
    assert event["error"]["code"] == code, event
    assert event["error"]["message"]
    return event["error"]


async def test_bad_input_gets_error_events_and_connection_goes_on(server: RunningServer) -> None:
    async with websockets.connect(f"{server.ws}/v1/realtime?model=x", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await _expect_error(ws, "{not json", "invalid_json")
        await _expect_error(ws, "[1, 2]", "invalid_event")
        big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (LIMIT + 10)})
        await _expect_error(ws, big, "message_too_large")
        err = await _expect_error(
            ws, json.dumps({"type": "no.such.event", "event_id": "evt_1"}), "unknown_event"
        )
        assert err["event_id"] == "evt_1" and err["param"] == "type"
        bad_fmt = {
            "type": "session.update",
            "session": {"audio": {"input": {"format": {"type": "audio/mp3"}}}},
        }
        err = await _expect_error(ws, json.dumps(bad_fmt), "invalid_value")
        assert err["param"] == "session.audio.input.format.type"
        bad_rate = {
            "type": "session.update",
            "session": {"input_audio_format": {"type": "audio/pcm", "rate": 16000}},
        }
        await _expect_error(ws, json.dumps(bad_rate), "invalid_value")
        bad_modes = {"type": "session.update", "session": {"output_modalities": ["video"]}}
        err = await _expect_error(ws, json.dumps(bad_modes), "invalid_value")
        assert err["param"] == "session.output_modalities"
        odd = {
            "type": "input_audio_buffer.append",
            "audio": base64.b64encode(b"\x01\x02\x03").decode(),
        }
        await _expect_error(ws, json.dumps(odd), "invalid_audio")
        await _expect_error(
            ws, json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_audio"
        )
        await _expect_error(
            ws, json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"
        )
        await _expect_error(
            ws, json.dumps({"type": "response.cancel"}), "response_cancel_not_active"
        )
        await _expect_error(
            ws,
            json.dumps(
                {"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 5}
            ),
            "invalid_value",
        )
        # still alive: a valid update is applied
        await ws.send(
            json.dumps({"type": "session.update", "session": {"instructions": "Be brief."}})
        )
        updated = await _recv_until(ws, "session.updated")
        assert updated["session"]["instructions"] == "Be brief."


async def test_text_turn_g711_and_beta_names(server: RunningServer) -> None:
    headers = {"OpenAI-Beta": "realtime=v1"}
    async with websockets.connect(
        f"{server.ws}/v1/realtime?model=x", additional_headers=headers, max_size=None
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "input_audio_format": "g711_ulaw",
                        "output_audio_format": "g711_ulaw",
                        "turn_detection": None,
                    },
                }
            )
        )
        updated = await _recv_until(ws, "session.updated")
        assert updated["session"]["output_audio_format"] == "g711_ulaw"
        await ws.send(
            json.dumps(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is the capital of France?"}
                        ],
                    },
                }
            )
        )
        assert (await _recv_until(ws, "conversation.item.created"))["item"]["role"] == "user"
        await ws.send(json.dumps({"type": "response.create"}))
        audio = bytearray()
        async with asyncio.timeout(120):
            while True:
                event = json.loads(await ws.recv())
                assert event["type"] != "response.output_audio.delta"  # beta names only
                if event["type"] == "response.audio.delta":
                    audio.extend(base64.b64decode(event["delta"]))
                if event["type"] == "response.done":
                    assert event["response"]["status"] == "completed"
                    break
        pcm = ulaw_decode(bytes(audio))
        assert len(pcm) > 8000 * 0.3 and rms(pcm) > 300
        # mu-law input through the same session
        q = speech(QUESTION, 8000)
        await ws.send(
            json.dumps(
                {
                    "type": "input_audio_buffer.append",
                    "audio": base64.b64encode(ulaw_encode(q)).decode(),
                }
            )
        )
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        item_id = (await _recv_until(ws, "input_audio_buffer.committed"))["item_id"]
        assert item_id
        await ws.send(json.dumps({"type": "response.create"}))
        # the mu-law speech was really heard: its transcript says the question's words
        heard = await _recv_until(ws, "conversation.item.input_audio_transcription.completed")
        assert heard["item_id"] == item_id
        words = heard["transcript"].lower()
        assert "capital" in words and "france" in words, heard["transcript"]
        assert (await _recv_until(ws, "response.done"))["response"]["status"] == "completed"


async def test_audio_item_is_transcribed_then_answered(server: RunningServer) -> None:
    def user_item(part: dict[str, Any]) -> str:
        item = {"type": "message", "role": "user", "content": [part]}
        return json.dumps({"type": "conversation.item.create", "item": item})

    async with websockets.connect(f"{server.ws}/v1/realtime?model=x", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        clip = base64.b64encode(speech(QUESTION, 24000).tobytes()).decode()  # audio/pcm 24 kHz
        await ws.send(user_item({"type": "input_audio", "audio": clip}))
        added = await _recv_until(ws, "conversation.item.added")
        (part,) = added["item"]["content"]
        assert part["type"] == "input_audio" and "capital" in part["transcript"].lower(), part
        await ws.send(json.dumps({"type": "response.create"}))
        done = await _recv_until(ws, "response.done", 120)
        assert done["response"]["status"] == "completed"
        assert done["response"]["output"][0]["content"][0]["transcript"].strip()
        # a broken or misplaced audio part: a clear error, and the connection goes on
        err = await _expect_error(
            ws, user_item({"type": "input_audio", "audio": "%%%"}), "invalid_audio"
        )
        assert err["param"] == "item.content[0].audio"
        odd = base64.b64encode(b"\x01\x02\x03").decode()
        await _expect_error(ws, user_item({"type": "input_audio", "audio": odd}), "invalid_audio")
        err = await _expect_error(ws, user_item({"type": "input_image"}), "invalid_value")
        assert err["param"] == "item.content[0].type"
        await ws.send(user_item({"type": "input_text", "text": "Thanks."}))
        assert (await _recv_until(ws, "conversation.item.added"))["item"]["role"] == "user"


async def test_text_only_output_and_a_per_response_override(server: RunningServer) -> None:
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{server.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        updated = await conn.recv()
        assert updated.type == "session.updated" and updated.session.output_modalities == ["text"]

        async def ask(question: str, **response: Any) -> tuple[list[str], Any]:
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": question}],
                }
            )
            if response:
                await conn.response.create(response=response)
            else:
                await conn.response.create()
            types: list[str] = []
            async with asyncio.timeout(120):
                async for event in conn:
                    types.append(event.type)
                    assert event.type != "error", event
                    if event.type == "response.done":
                        return types, event.response
            raise AssertionError("no response.done")

        types, done = await ask("What is the capital of France?")
        assert "response.output_text.delta" in types and "response.output_text.done" in types
        assert not any(t.startswith("response.output_audio") for t in types)
        assert done.status == "completed" and done.output_modalities == ["text"]
        part = done.output[0].content[0]
        assert part.type == "output_text" and part.text.strip()

        # one spoken answer on request, then the session's text-only setting again
        types, done = await ask("And of Italy?", output_modalities=["audio"])
        assert "response.output_audio.delta" in types and done.output_modalities == ["audio"]
        assert done.output[0].content[0].type == "output_audio"
        types, done = await ask("And of Spain?")
        assert "response.output_text.delta" in types
        assert not any(t.startswith("response.output_audio") for t in types)


async def test_disconnect_mid_answer_leaves_server_and_other_sessions(
    server: RunningServer,
) -> None:
    pcm = speech(QUESTION, 24000)
    payloads = [
        json.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(c.tobytes()).decode()}
        )
        for c in chunks(pcm, 4800)
    ]
    manual = json.dumps({"type": "session.update", "session": {"turn_detection": None}})
    async with websockets.connect(f"{server.ws}/v1/realtime", max_size=None) as other:
        await other.recv()
        leaver = await websockets.connect(f"{server.ws}/v1/realtime", max_size=None)
        await leaver.recv()
        for ws in (leaver, other):
            await ws.send(manual)
            await _recv_until(ws, "session.updated")
            for p in payloads:
                await ws.send(p)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
        await _recv_until(leaver, "response.output_audio.delta", 120)
        await leaver.close()  # gone mid-answer
        done = await _recv_until(other, "response.done", 120)
        assert done["response"]["status"] == "completed"
    await asyncio.sleep(0.3)
    async with websockets.connect(f"{server.ws}/v1/realtime") as again:
        assert json.loads(await again.recv())["type"] == "session.created"


async def test_cancel_mid_answer_then_the_next_answer_completes(server: RunningServer) -> None:
    """``response.cancel`` reaches the real session's turn controller: the answer stops, and the
    session answers the next request (a second ``response.create`` meanwhile is refused)."""

    def item(text: str) -> str:
        content = [{"type": "input_text", "text": text}]
        return json.dumps(
            {"type": "conversation.item.create", "item": {"role": "user", "content": content}}
        )

    async with websockets.connect(f"{server.ws}/v1/realtime", max_size=None) as ws:
        await ws.recv()
        await ws.send(item("Tell me a story about a dragon."))
        await ws.send(json.dumps({"type": "response.create"}))
        await _recv_until(ws, "response.output_audio.delta", 120)
        await ws.send(json.dumps({"type": "response.cancel"}))
        done = (await _recv_until(ws, "response.done"))["response"]
        assert done["status"] == "cancelled"
        assert done["status_details"]["reason"] == "client_cancelled"
        await ws.send(item("And what is two plus two?"))
        await ws.send(json.dumps({"type": "response.create"}))
        await ws.send(json.dumps({"type": "response.create", "event_id": "e2"}))
        events = []
        async with asyncio.timeout(120):
            while not events or events[-1]["type"] != "response.done":
                events.append(json.loads(await ws.recv()))
        errors = [e for e in events if e["type"] == "error"]
        assert errors and errors[0]["error"]["code"] == "conversation_already_has_active_response"
        assert events[-1]["response"]["status"] == "completed"
        assert any(e["type"] == "response.output_audio.delta" for e in events)


async def test_session_limit_and_health(server: RunningServer) -> None:
    conns = [await websockets.connect(f"{server.ws}/v1/realtime") for _ in range(3)]
    try:
        for c in conns:
            await c.recv()
        async with websockets.connect(f"{server.ws}/v1/realtime") as extra:
            event = json.loads(await extra.recv())
            assert event["type"] == "error" and event["error"]["code"] == "session_limit_reached"
    finally:
        for c in conns:
            await c.close()
    import aiohttp

    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http}/healthz") as r:
            assert r.status == 200 and (await r.json())["sessions"] == 0
        async with http.get(f"{server.http}/metrics") as r:
            text = await r.text()
            assert "agent_first_packet_seconds_bucket" in text
            assert 'agent_turns_total{transport="realtime"}' in text
