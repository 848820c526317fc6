"""/twilio details on the real Session: keypad keys (``dtmf``) reach the session as events and
the engine as text. (That echoed ``mark``s truncate an interrupted answer at the last mark
Twilio played is tested, with the pacing, in test_twilio_pacing.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest
import pytest_asyncio
import websockets
from server_helpers import RunningServer, start_server
from test_server_twilio import SID, start_message

from realtime.config import ServerConfig, TelephonyConfig
from realtime.frames import Dtmf, frame_to_event

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(server_runtime: Any) -> Any:
    if getattr(server_runtime, "config", None) is None:
        pytest.skip("needs the real Session (SERVER_TESTS_FAKE_RUNTIME is set)")
    srv = await start_server(server_runtime, ServerConfig())
    yield srv
    await srv.runner.cleanup()


def _dtmf(digit: Any) -> str:
    return json.dumps(
        {"event": "dtmf", "streamSid": SID, "dtmf": {"track": "inbound_track", "digit": digit}}
    )


async def _the_session(runtime: Any) -> Any:
    async with asyncio.timeout(10):
        while len(runtime.sessions) != 1:
            await asyncio.sleep(0.01)
    return next(iter(runtime.sessions))


async def _engine_prompt(session: Any) -> str:
    await session.models.worker.call(lambda: None)  # the engine's jobs ran (in order)
    return json.dumps(session.engine.session._messages(None))


async def test_keys_are_session_events_and_engine_text(server_runtime: Any) -> None:
    session = server_runtime.new_session(pace_output=False)
    await session.start()
    try:
        await session.press_key("7")
        async with asyncio.timeout(5):
            frame = await anext(session.frames())
        assert frame == Dtmf("7") and frame_to_event(frame) == {"event": "dtmf", "digit": "7"}
        assert session.controller.pending_text == "[keypad: 7]"
        with pytest.raises(ValueError, match="keypad key"):
            await session.press_key("77")
        # telephony.dtmf_to_engine off: an event only, nothing for the engine
        session.controller.pending_text = None
        session.ctx.config = dataclasses.replace(
            session.ctx.config, telephony=TelephonyConfig(dtmf_to_engine=False)
        )
        await session.press_key("#")
        async with asyncio.timeout(5):
            assert await anext(session.frames()) == Dtmf("#")
        assert session.controller.pending_text is None
    finally:
        await session.close()


async def test_keys_alone_are_answered(server: RunningServer, server_runtime: Any) -> None:
    async with websockets.connect(f"{server.ws}/twilio") as ws:
        await ws.send(start_message())
        await ws.send(_dtmf("X"))
        err = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert err["event"] == "error" and err["error"]["code"] == "invalid_message"
        session = await _the_session(server_runtime)
        await ws.send(_dtmf("1"))
        await ws.send(_dtmf("2"))
        async with asyncio.timeout(120):  # telephony.dtmf_respond_after_s later, an answer
            while json.loads(await ws.recv())["event"] != "media":
                pass
        await session.wait_idle()
        assert session.history[-1].user == "[keypad: 1] [keypad: 2]"
        assert "[keypad: 1] [keypad: 2]" in await _engine_prompt(session)
        await ws.send(json.dumps({"event": "stop", "streamSid": SID}))
