"""Tools over ``/v1/realtime`` with the official ``openai`` SDK, against real engines.

The tiny Step-Audio checkpoint is scripted to call ``get_weather`` (deterministic): the client
declares the tool, gets the ``function_call`` item, its arguments and ``response.done``, sends
the output back, and the next response reads it (the engine's history holds it in Step-Audio's
``input`` role). The default SmolLM2 engine, made to call the tool by ``tool_choice``, then
speaks an answer from the tool's output.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from server_helpers import RunningServer, start_server
from step_audio_fixtures import TOOL_CALL, TOOL_CALL_WORDS, scripted, write_tiny_checkpoint

from realtime.config import load_config
from realtime.runtime import Runtime

pytestmark = pytest.mark.asyncio(loop_scope="module")

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "the city"}},
        "required": ["city"],
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def step_audio_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = write_tiny_checkpoint(
        tmp_path_factory.mktemp("caller"), modify=scripted(*TOOL_CALL), words=TOOL_CALL_WORDS
    )
    cfg = load_config(
        "step-audio-r1",
        {
            "engine.model": str(path),
            "engine.device": "cpu",
            "engine.dtype": "float32",
            "engine.max_context": 2048,
            "engine.max_batch": 2,
            "engine.sampling.think_budget": 0,
            "engine.sampling.max_new_tokens": 24,
        },
    )
    rt = await Runtime.create(cfg)
    srv = await start_server(rt)
    yield srv, rt
    await srv.runner.cleanup()
    await rt.close()


async def _until_done(conn: Any, timeout: float = 300) -> tuple[list[Any], Any]:
    events: list[Any] = []
    async with asyncio.timeout(timeout):
        async for event in conn:
            events.append(event)
            assert event.type != "error", event
            if event.type == "response.done":
                return events, event.response
    raise AssertionError("no response.done")


async def _ask(conn: Any, text: str) -> None:
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    added = await conn.recv()
    assert added.type == "conversation.item.added", added
    assert (await conn.recv()).type == "conversation.item.done"
    await conn.response.create()


async def _send_output(conn: Any, call_id: str, output: str) -> None:
    await conn.conversation.item.create(
        item={"type": "function_call_output", "call_id": call_id, "output": output}
    )
    added = await conn.recv()
    assert added.type == "conversation.item.added", added
    assert added.item.type == "function_call_output" and added.item.call_id == call_id
    assert (await conn.recv()).type == "conversation.item.done"


async def test_step_audio_scripted_call_and_its_result(step_audio_server: Any) -> None:
    srv, rt = step_audio_server
    server: RunningServer = srv
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{server.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        assert (await conn.recv()).type == "session.created"
        await conn.session.update(
            session={"type": "realtime", "tools": [WEATHER], "tool_choice": "auto"}
        )
        updated = await conn.recv()
        assert updated.type == "session.updated", updated
        assert [t.name for t in updated.session.tools] == ["get_weather"]
        assert updated.session.tool_choice == "auto"

        await _ask(conn, "What is the weather in Paris?")
        events, done = await _until_done(conn)
        types = [e.type for e in events]
        added = next(e for e in events if e.type == "response.output_item.added")
        assert added.item.type == "function_call" and added.item.name == "get_weather"
        call_id = added.item.call_id
        assert call_id
        deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
        args_done = next(e for e in events if e.type == "response.function_call_arguments.done")
        assert "".join(d.delta for d in deltas) == args_done.arguments
        assert json.loads(args_done.arguments) == {"city": "Paris"}
        assert args_done.call_id == call_id and args_done.name == "get_weather"
        assert types.index("response.function_call_arguments.done") < types.index(
            "response.output_item.done"
        )
        assert not any(t.startswith("response.output_audio") for t in types)  # nothing spoken
        assert done.status == "completed"
        assert [o.type for o in done.output] == ["function_call"]
        assert done.output[0].call_id == call_id and done.output[0].status == "completed"

        await _send_output(conn, call_id, '{"sky": "sunny", "temp_c": 18}')
        await conn.response.create()
        _, done2 = await _until_done(conn)
        assert done2.status == "completed"
        # the output reached the engine in Step-Audio's tool-result role
        await rt.worker.call(lambda: None)  # the turn's commit, queued before, has run
        (session,) = rt.sessions
        turn = session.engine.session.conv.turns[-1]
        assert [(m.role, m.parts) for m in turn.inputs] + [(turn.user.role, turn.user.parts)] == [
            ("input", ('{"sky": "sunny", "temp_c": 18}',))
        ]

        # an output for a call that never was is refused, the connection goes on
        await conn.conversation.item.create(
            item={"type": "function_call_output", "call_id": "call_nope", "output": "{}"}
        )
        err = await conn.recv()
        assert err.type == "error" and err.error.param == "item.call_id"


async def test_bad_tool_declarations_get_clear_errors(step_audio_server: Any) -> None:
    srv, _ = step_audio_server
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{srv.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        assert (await conn.recv()).type == "session.created"
        bad = [
            ({"tools": [{"type": "code_interpreter"}]}, "session.tools[0]"),
            ({"tools": [{"type": "function", "name": "has space"}]}, "session.tools[0]"),
            ({"tools": [{**WEATHER, "parameters": {"type": "object", "properties": 3}}]},
             "session.tools[0]"),
            ({"tools": [WEATHER, WEATHER]}, "session.tools"),
            ({"tools": [WEATHER], "tool_choice": "sometimes"}, "session.tool_choice"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}},
             "session.tool_choice"),
        ]  # fmt: skip
        for session, param in bad:
            await conn.session.update(session={"type": "realtime", **session})
            err = await conn.recv()
            assert err.type == "error", (session, err)
            assert err.error.param == param, (session, err.error)
        await conn.session.update(
            session={
                "type": "realtime",
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "name": "get_weather"},
            }
        )
        updated = await conn.recv()
        assert updated.type == "session.updated"
        assert updated.session.tool_choice.name == "get_weather"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smollm_server(server_runtime: Any) -> Any:
    srv = await start_server(server_runtime)
    yield srv
    await srv.runner.cleanup()


async def test_smollm2_calls_then_speaks_from_the_result(smollm_server: RunningServer) -> None:
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{smollm_server.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        assert (await conn.recv()).type == "session.created"
        choice = {"type": "function", "name": "get_weather"}  # the call is made to start
        await conn.session.update(
            session={"type": "realtime", "tools": [WEATHER], "tool_choice": choice}
        )
        assert (await conn.recv()).type == "session.updated"
        await _ask(conn, "What is the weather like in Paris?")
        _, done = await _until_done(conn)
        calls = [o for o in done.output if o.type == "function_call"]
        assert done.status == "completed" and calls, done
        assert calls[0].name == "get_weather"
        assert "city" in json.loads(calls[0].arguments)

        await _send_output(conn, calls[0].call_id, '{"city": "Paris", "sky": "sunny"}')
        await conn.session.update(session={"type": "realtime", "tool_choice": "none"})
        assert (await conn.recv()).type == "session.updated"
        await conn.response.create()
        events, done2 = await _until_done(conn)
        assert done2.status == "completed"
        assert any(e.type == "response.output_audio.delta" for e in events)  # spoken
        message = next(o for o in done2.output if o.type == "message")
        assert message.content[0].transcript.strip()
