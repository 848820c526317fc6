"""``conversation.item.truncate``, ``.retrieve`` and ``.delete`` on the real Session with the
real (small) engine: the history, the engine's included, keeps the words heard of a truncated
answer and forgets a deleted item; unknown ids are errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import pytest_asyncio
import websockets
from server_helpers import RunningServer, start_server

from realtime.config import ServerConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")

Q1 = "Tell me about the city of Paris."
Q2 = "What do bees make?"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    srv = await start_server(server_runtime, ServerConfig())
    yield srv
    await srv.runner.cleanup()


async def _recv_until(ws: Any, type_: str, timeout: float = 120) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == type_:
                return event


async def _send(ws: Any, **event: Any) -> None:
    await ws.send(json.dumps(event))


async def _ask(ws: Any, text: str) -> tuple[str, str]:
    """A typed question and its spoken answer: (user item id, assistant item id)."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await _send(ws, type="conversation.item.create", item=item)
    user = (await _recv_until(ws, "conversation.item.added"))["item"]["id"]
    await _send(ws, type="response.create")
    done = await _recv_until(ws, "response.done")
    assert done["response"]["status"] == "completed", done
    return user, done["response"]["output"][0]["id"]


async def _error(ws: Any, **event: Any) -> dict[str, Any]:
    await _send(ws, **event)
    return (await _recv_until(ws, "error", 10))["error"]


def _engine_prompt(session: Any) -> str:
    """What the engine would be given before the next question (the SmolLM engine)."""
    return json.dumps(session.engine.session._messages(None))


async def _engine_done(session: Any) -> None:
    await session.models.worker.call(lambda: None)  # jobs run in order: the revisions ran


async def test_truncate_retrieve_delete(server: RunningServer, server_runtime: Any) -> None:
    if getattr(server_runtime, "config", None) is None:
        pytest.skip("needs the real Session (SERVER_TESTS_FAKE_RUNTIME is set)")
    async with websockets.connect(f"{server.ws}/v1/realtime?model=x", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await _send(
            ws, type="session.update", session={"audio": {"input": {"turn_detection": None}}}
        )
        await _recv_until(ws, "session.updated")
        (session,) = server_runtime.sessions
        u1, a1 = await _ask(ws, Q1)
        entry = session.history[-1]
        full = entry.answer.strip()
        assert entry.spoken == full and len(entry.response.pieces) >= 2, entry

        # retrieve: the items as the conversation holds them
        await _send(ws, type="conversation.item.retrieve", item_id=u1)
        got = (await _recv_until(ws, "conversation.item.retrieved"))["item"]
        assert got["id"] == u1 and got["content"][0]["text"] == Q1
        await _send(ws, type="conversation.item.retrieve", item_id=a1)
        got = (await _recv_until(ws, "conversation.item.retrieved"))["item"]
        assert got["role"] == "assistant" and got["content"][0]["transcript"].strip() == full

        # truncate: the user heard only the first piece (the second begins later than 1 ms)
        first = entry.response.pieces[0].text.strip()
        await _send(
            ws, type="conversation.item.truncate", item_id=a1, content_index=0, audio_end_ms=1
        )
        done = await _recv_until(ws, "conversation.item.truncated")
        assert done["item_id"] == a1 and done["audio_end_ms"] == 1
        assert entry.spoken == first and first != full
        await _engine_done(session)
        prompt = _engine_prompt(session)
        assert json.dumps(first + " ...")[1:-1] in prompt, prompt
        assert json.dumps(full)[1:-1] not in prompt
        await _send(ws, type="conversation.item.retrieve", item_id=a1)
        got = (await _recv_until(ws, "conversation.item.retrieved"))["item"]
        assert got["content"][0]["transcript"] == first

        # delete: the question and its answer leave the engine's history too
        await _send(ws, type="conversation.item.delete", item_id=u1)
        assert (await _recv_until(ws, "conversation.item.deleted"))["item_id"] == u1
        await _send(ws, type="conversation.item.delete", item_id=a1)
        assert (await _recv_until(ws, "conversation.item.deleted"))["item_id"] == a1
        await _engine_done(session)
        prompt = _engine_prompt(session)
        assert "Paris" not in prompt and first not in prompt, prompt
        u2, _ = await _ask(ws, Q2)
        await _engine_done(session)
        prompt = _engine_prompt(session)
        assert Q2 in prompt and Q1 not in prompt, prompt

        # unknown or deleted ids are errors; the connection goes on
        for kind in ("retrieve", "delete"):
            err = await _error(ws, type=f"conversation.item.{kind}", item_id=u1)
            assert err["code"] == "invalid_value" and u1 in err["message"]
        err = await _error(ws, type="conversation.item.truncate", item_id="nope", audio_end_ms=5)
        assert err["param"] == "item_id"
        err = await _error(ws, type="conversation.item.truncate", item_id=u2, audio_end_ms=5)
        assert err["param"] == "item_id"  # a user item has no audio of the agent's to cut
        await _send(ws, type="conversation.item.retrieve", item_id=u2)
        assert (await _recv_until(ws, "conversation.item.retrieved"))["item"]["id"] == u2
