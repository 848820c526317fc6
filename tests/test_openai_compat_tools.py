"""Tools through ``engine.backend: openai-compatible``.

- Against real LLM servers, driven over ``/v1/realtime`` with the official ``openai`` SDK, a
  recording proxy in front of each showing what the engine sent:
  - llama-cpp-python's server on the SmolLM2 GGUF with no ``--chat_format``: it renders the
    GGUF's own Jinja chat template (ChatML, every role written out, ``tool`` included) and,
    for a named ``tool_choice``, streams the call with its arguments held to the tool's JSON
    schema by a grammar. The call, then the answer spoken from the tool's output: the output
    is in the prompt the template renders, and the words come from it;
  - the same server with ``--chat_format chatml-function-calling``, the one llama-cpp-python
    format that lets the model choose (``auto``), which it cannot stream. That format drops
    ``role: tool`` content from its prompt: its answer after an output says the output only
    with ``engine.remote.tool_results: as_user_text`` (engine straight on the server).
- The streamed ``tool_calls`` accumulation, against a SCRIPTED OpenAI-format stream: a small
  real aiohttp server that sends canned chunks the way OpenAI's API does (id and name in a
  call's first piece only, arguments in fragments, two calls interleaved by index).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from openai import AsyncOpenAI
from server_helpers import start_server
from test_engine_openai_compat import FaultyServer, llama_process

from realtime.config import ConfigError, load_config
from realtime.engine.base import CancelToken, TokenEvent, UserTurn
from realtime.engine.openai_compat import OpenAICompatEngine, RemoteEngineError
from realtime.engine.smollm import bundled_gguf
from realtime.engine.tools import ToolResult, ToolSpec, parse_tool_calls

pytestmark = pytest.mark.slow

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
WEATHER_SPEC = ToolSpec("get_weather", WEATHER["description"], WEATHER["parameters"])
TIME_SPEC = ToolSpec("get_time", "The time in a city.", WEATHER["parameters"])


# -- a real server: llama.cpp's chatml-function-calling ------------------------------------
class RecordingProxy(FaultyServer):
    """Passes every request through to the LLM server as it answers it (streamed or not),
    keeping the request bodies; the runtime's warm-up gets ``FaultyServer``'s canned answer."""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.mode != "proxy":
            return await super()._chat(request)
        body = await request.json()
        self.requests.append(body)
        if not self.client.connector or not self.client.connector.force_close:
            # a fresh connection each time: llama.cpp's server closes one whose stream failed
            await self.client.close()
            self.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with self.client.post(f"{self.upstream}/chat/completions", json=body) as up:
            kind = up.headers.get("Content-Type", "application/json")
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": kind})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
        return resp


@pytest.fixture(scope="module")
def function_calling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingProxy]:
    """llama-cpp-python's server with the chatml-function-calling chat format, behind a
    recording proxy."""
    log = tmp_path_factory.mktemp("llama-fc") / "server.log"
    with llama_process(log, "--chat_format", "chatml-function-calling") as base:
        proxy = RecordingProxy(base)
        try:
            yield proxy
        finally:
            proxy.close()


@pytest.fixture(scope="module")
def template_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RecordingProxy, Path]]:
    """llama-cpp-python's server with no chat format named: it renders the GGUF's own chat
    template. Behind a recording proxy; (proxy, the server's log)."""
    log = tmp_path_factory.mktemp("llama-template") / "server.log"
    with llama_process(log) as base:
        proxy = RecordingProxy(base)
        try:
            yield proxy, log
        finally:
            proxy.close()


async def _serve(proxy: RecordingProxy) -> Any:
    """The realtime server on the engine ``engine.backend: openai-compatible`` through
    ``proxy``: (its handle, the runtime)."""
    from realtime.runtime import Runtime

    proxy.mode = "reasoning"  # the runtime's warm-up gets the canned answer
    sets = {
        "engine.backend": "openai-compatible",
        "engine.model": "smollm2",
        "engine.remote": {"base_url": proxy.base_url, "read_timeout_s": 30.0},
        "engine.sampling.max_new_tokens": 40,
        "asr.backend": "none",
        "tts.backend": "espeak",
    }
    rt = await Runtime.create(load_config("embedded", sets))
    proxy.mode = "proxy"
    return await start_server(rt), rt


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def realtime_server(function_calling_server: RecordingProxy) -> Any:
    srv, rt = await _serve(function_calling_server)
    yield srv, function_calling_server
    await srv.runner.cleanup()
    await rt.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def template_realtime(template_server: tuple[RecordingProxy, Path]) -> Any:
    proxy, log = template_server
    srv, rt = await _serve(proxy)
    yield srv, proxy, log
    await srv.runner.cleanup()
    await rt.close()


def gguf_prompt(messages: list[dict[str, Any]]) -> str:
    """The prompt llama-cpp-python renders for ``messages`` with the GGUF's own chat template
    (the formatter it builds from the file's ``tokenizer.chat_template``)."""
    vocab = Llama(str(bundled_gguf()), vocab_only=True, verbose=False)
    eos = vocab.detokenize([vocab.token_eos()], special=True).decode()
    bos = vocab.detokenize([vocab.token_bos()], special=True).decode()
    template = vocab.metadata["tokenizer.chat_template"]
    return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt


async def _until_done(conn: Any, timeout: float = 300) -> tuple[list[Any], Any]:
    events: list[Any] = []
    async with asyncio.timeout(timeout):
        async for event in conn:
            events.append(event)
            assert event.type != "error", event
            if event.type == "response.done":
                return events, event.response
    raise AssertionError("no response.done")


async def _recv(conn: Any, kind: str) -> Any:
    event = await conn.recv()
    assert event.type == kind, event
    return event


async def _say(conn: Any, text: str) -> None:
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )  # fmt: skip
    await _recv(conn, "conversation.item.added")
    await _recv(conn, "conversation.item.done")


def _spoken(events: list[Any], done: Any) -> str:
    """The transcript of the answer's spoken message (asserting it was spoken)."""
    assert done.status == "completed", done
    assert any(e.type == "response.output_audio.delta" for e in events)
    message = next(o for o in done.output if o.type == "message")
    return str(message.content[0].transcript)


# the tool's output: values the model would not say about Paris on its own
WEATHER_OUTPUT = '{"city": "Paris", "temp_c": 31, "sky": "thunderstorms"}'
QUESTION = "What is the weather like in Paris?"
SAID = ("31", "thunderstorm")  # what an answer from it says


@pytest.mark.asyncio(loop_scope="module")
async def test_a_named_tool_is_called_then_the_agent_speaks_from_its_output(
    template_realtime: Any,
) -> None:
    srv, proxy, log = template_realtime
    # the server renders the GGUF's chat template (not a built-in format that drops roles)
    assert "Using gguf chat template" in log.read_text(errors="replace")
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{srv.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        await _recv(conn, "session.created")
        choice = {"type": "function", "name": "get_weather"}
        await conn.session.update(
            session={"type": "realtime", "tools": [WEATHER], "tool_choice": choice}
        )
        await _recv(conn, "session.updated")
        await _say(conn, QUESTION)
        await conn.response.create()
        events, done = await _until_done(conn)
        # the request declared the tool and named it in tool_choice, in the Chat Completions form
        first = proxy.requests[-1]
        assert first["tools"] == [WEATHER_SPEC.to_openai()]
        assert first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
        assert first["stream"] is True
        calls = [o for o in done.output if o.type == "function_call"]
        assert done.status == "completed" and calls, done
        assert calls[0].name == "get_weather"
        args = json.loads(calls[0].arguments)  # the grammar keeps them to the schema
        assert isinstance(args.get("city"), str), args
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert json.loads("".join(deltas)) == args
        assert not any(e.type == "response.output_audio.delta" for e in events)

        await conn.conversation.item.create(
            item={
                "type": "function_call_output",
                "call_id": calls[0].call_id,
                "output": WEATHER_OUTPUT,
            }
        )
        await _recv(conn, "conversation.item.added")
        await _recv(conn, "conversation.item.done")
        await conn.session.update(session={"type": "realtime", "tool_choice": "none"})
        await _recv(conn, "session.updated")
        await conn.response.create()
        answer = _spoken(*await _until_done(conn))
        # the history carried the call with the server's id, and the output answering it
        second = proxy.requests[-1]
        assert second["tool_choice"] == "none"
        roles = [m["role"] for m in second["messages"]]
        assert roles == ["system", "user", "assistant", "tool"], roles
        call = second["messages"][2]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == args
        assert call["id"].startswith("call_")  # llama.cpp's id for it
        assert second["messages"][3] == {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": WEATHER_OUTPUT,
        }
    # the output is in the prompt the server's template makes of that request, last before
    # the answer
    prompt = gguf_prompt(second["messages"])
    assert prompt.endswith(f"<|im_start|>tool\n{WEATHER_OUTPUT}<|im_end|>\n<|im_start|>assistant\n")
    # and the spoken words come from it (greedy decoding: SmolLM2-135M says "thunderstorms")
    assert any(v in answer.lower() for v in SAID), answer

    # the same question without the tool's output: neither value (the words were the output's)
    async with client.realtime.connect(model="local-agent") as conn:
        await _recv(conn, "session.created")
        await _say(conn, QUESTION)
        await conn.response.create()
        plain = _spoken(*await _until_done(conn))
    assert [m["role"] for m in proxy.requests[-1]["messages"]] == ["system", "user"]
    assert "tools" not in proxy.requests[-1]
    assert not any(v in plain.lower() for v in SAID), plain


@pytest.mark.asyncio(loop_scope="module")
async def test_auto_choice_falls_back_to_an_unstreamed_request(realtime_server: Any) -> None:
    """llama-cpp-python cannot stream tool_choice "auto" (its stream ends empty): the engine
    asks again without streaming, and from then on asks so for "auto" at once."""
    srv, proxy = realtime_server
    client = AsyncOpenAI(api_key="x", websocket_base_url=f"{srv.ws}/v1")
    async with client.realtime.connect(model="local-agent") as conn:
        await _recv(conn, "session.created")
        await conn.session.update(
            session={"type": "realtime", "tools": [WEATHER], "tool_choice": "auto"}
        )
        await _recv(conn, "session.updated")
        before = len(proxy.requests)
        for n in range(2):
            text = "What is the weather like in Oslo?" if n == 0 else "And in Rome?"
            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
            )  # fmt: skip
            await _recv(conn, "conversation.item.added")
            await _recv(conn, "conversation.item.done")
            await conn.response.create()
            _, done = await _until_done(conn)
            assert done.status == "completed", done
            kinds = {o.type for o in done.output}
            assert kinds & {"function_call", "message"}, done  # a call or spoken words
            if "function_call" in kinds:
                call = next(o for o in done.output if o.type == "function_call")
                await conn.conversation.item.create(
                    item={"type": "function_call_output", "call_id": call.call_id, "output": "{}"}
                )
                await _recv(conn, "conversation.item.added")
                await _recv(conn, "conversation.item.done")
        streamed = [r.get("stream") for r in proxy.requests[before:]]
        assert streamed == [True, False, False], streamed  # asked again, then at once unstreamed


def test_llama_cpp_direct_auto_required_and_named(function_calling_server: RecordingProxy) -> None:
    """The engine straight on llama.cpp's server (no proxy): "auto" comes back unstreamed
    after the empty stream, "required" (which chatml-function-calling cannot do) is a clear
    error, and the next requests still work on fresh connections."""
    sets = {
        "engine.backend": "openai-compatible",
        "engine.model": "smollm2",
        "engine.remote": {"base_url": function_calling_server.upstream, "read_timeout_s": 30.0},
        "engine.sampling.max_new_tokens": 40,
    }
    engine = OpenAICompatEngine(load_config("embedded", sets).engine)
    session = engine.new_session("You are a helpful assistant.", engine.cfg.sampling)
    turn = UserTurn(text="What is the weather like in Paris?")
    try:
        for choice in ("auto", "required", "auto", "get_weather"):
            session.set_tools((WEATHER_SPEC,), choice)
            if choice == "required":
                with pytest.raises(RemoteEngineError, match="HTTP 500"):
                    _events(session, turn)
                continue
            events = _events(session, turn)
            assert [ev for ev in events if ev.kind in ("tool_call", "answer")], (choice, events)
            if choice == "get_weather":
                (call,) = [parse_tool_calls(ev.text) for ev in events if ev.kind == "tool_call"]
                assert call[0].name == "get_weather" and "city" in json.loads(call[0].arguments)
        assert engine.unstreamable == {"auto", "required"}
    finally:
        session.close()
        engine.close()


def test_chatml_function_calling_hears_results_only_as_user_text(
    function_calling_server: RecordingProxy,
) -> None:
    """chatml-function-calling drops ``role: tool`` content from its prompt: the answer after
    the output does not say it. With ``engine.remote.tool_results: as_user_text`` the output
    goes as a user message, which it renders, and the answer says it (greedy decoding)."""
    answers: dict[str, str] = {}
    for mode in ("native", "as_user_text"):
        sets = {
            "engine.backend": "openai-compatible",
            "engine.model": "smollm2",
            "engine.remote": {
                "base_url": function_calling_server.upstream,
                "read_timeout_s": 30.0,
                "tool_results": mode,
            },
            "engine.sampling.max_new_tokens": 40,
        }
        engine = OpenAICompatEngine(load_config("embedded", sets).engine)
        session = engine.new_session(engine.cfg.system_prompt, engine.cfg.sampling)
        try:
            session.set_tools((WEATHER_SPEC,), "get_weather")
            ask = UserTurn(text=QUESTION)
            (call,) = [ev for ev in _events(session, ask) if ev.kind == "tool_call"]
            assert parse_tool_calls(call.text)[0].name == "get_weather"
            session.commit(ask, "", interrupted=False)
            session.set_tools((WEATHER_SPEC,), "none")
            back = UserTurn(
                text="", tool_results=(ToolResult("c1", "get_weather", WEATHER_OUTPUT),)
            )
            answers[mode] = "".join(ev.text for ev in _events(session, back) if ev.kind == "answer")
        finally:
            session.close()
            engine.close()
    assert any(v in answers["as_user_text"].lower() for v in SAID), answers
    assert not any(v in answers["native"].lower() for v in SAID), answers


# -- a SCRIPTED OpenAI-format stream: the accumulation of delta.tool_calls -------------------
def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(event)}\n\n".encode()


def _piece(index: int, arguments: str, call_id: str = "", name: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:  # OpenAI sends the id, type and name in a call's first piece only
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


class ScriptedToolStream(FaultyServer):
    """A real aiohttp server on loopback that answers every chat request with a canned OpenAI
    stream: a few words, then two tool calls whose pieces interleave ("stream"), the same
    answer as one JSON body ("json"), or one call and no ``finish_reason`` ("cut")."""

    def __init__(self) -> None:
        super().__init__(upstream="")
        self.mode = "stream"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.mode == "json":
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_w",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            }
            return web.json_response(
                {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = [_chunk({"role": "assistant", "content": "Let me check."})]
        if self.mode == "cut":
            chunks += [_chunk(_piece(0, '{"city": ', "call_c", "get_weather"))]
            chunks += [_chunk(_piece(0, '"Rome"}'))]
        else:
            chunks += [
                _chunk(_piece(0, "", "call_w", "get_weather")),
                _chunk(_piece(0, '{"ci')),
                _chunk(_piece(1, '{"city"', "call_t", "get_time")),
                _chunk(_piece(0, 'ty": "Par')),
                _chunk(_piece(1, ': "Lima"}')),
                _chunk(_piece(0, 'is"}')),
                _chunk({}, finish="tool_calls"),
            ]
        for chunk in chunks:
            await resp.write(chunk)
        if self.mode != "cut":
            await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[OpenAICompatEngine, ScriptedToolStream]]:
    server = ScriptedToolStream()
    sets = {
        "engine.backend": "openai-compatible",
        "engine.model": "scripted",
        "engine.remote": {"base_url": server.base_url, "read_timeout_s": 5.0},
    }
    engine = OpenAICompatEngine(load_config("embedded", sets).engine)
    yield engine, server
    engine.close()
    server.close()


def _events(session: Any, turn: UserTurn) -> list[TokenEvent]:
    return [ev for ev in session.respond(turn, CancelToken()) if ev is not None]


def test_scripted_stream_tool_call_pieces_become_whole_calls(scripted: Any) -> None:
    engine, server = scripted
    server.mode = "stream"
    session = engine.new_session("You are helpful.", engine.cfg.sampling)
    session.set_tools((WEATHER_SPEC, TIME_SPEC), "auto")
    turn = UserTurn(text="Weather in Paris and time in Lima?")
    events = _events(session, turn)
    assert server.requests[-1]["tool_choice"] == "auto"
    assert [t["function"]["name"] for t in server.requests[-1]["tools"]] == [
        "get_weather",
        "get_time",
    ]
    answer = "".join(ev.text for ev in events if ev.kind == "answer")
    assert answer.strip() == "Let me check."
    calls = [parse_tool_calls(ev.text) for ev in events if ev.kind == "tool_call"]
    assert [(c[0].name, json.loads(c[0].arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"city": "Lima"}),
    ]
    session.commit(turn, answer, interrupted=False)

    # the outputs come back (ids are the responder's, not the server's): matched by name
    results = (
        ToolResult("call_resp_2", "get_time", "09:00"),
        ToolResult("call_resp_1", "get_weather", "sunny"),
    )
    session.set_tools((WEATHER_SPEC, TIME_SPEC), "none")
    _events(session, UserTurn(text="", tool_results=results))
    sent = server.requests[-1]
    assert sent["tool_choice"] == "none"
    msgs = sent["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool"]
    assert msgs[2]["content"] == "Let me check."
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in msgs[2]["tool_calls"]] == [
        ("call_w", "get_weather", '{"city": "Paris"}'),
        ("call_t", "get_time", '{"city": "Lima"}'),
    ]  # fmt: skip
    assert msgs[3] == {"role": "tool", "tool_call_id": "call_t", "content": "09:00"}
    assert msgs[4] == {"role": "tool", "tool_call_id": "call_w", "content": "sunny"}
    session.close()


def test_scripted_named_choice_json_answer_and_a_stream_without_finish(scripted: Any) -> None:
    engine, server = scripted
    session = engine.new_session("You are helpful.", engine.cfg.sampling)
    session.set_tools((WEATHER_SPEC,), "get_weather")
    server.mode = "json"  # a server that does not stream: the call is in the message
    events = _events(session, UserTurn(text="Weather in Oslo?"))
    assert server.requests[-1]["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    (call,) = [ev for ev in events if ev.kind == "tool_call"]
    assert json.loads(call.text) == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}

    server.mode = "cut"  # the stream ends with no finish_reason and no [DONE]
    events = _events(session, UserTurn(text="Weather in Rome?"))
    (call,) = [ev for ev in events if ev.kind == "tool_call"]
    assert parse_tool_calls(call.text)[0].arguments == '{"city":"Rome"}'

    # an output for a call the history lacks gets the call written before it
    session.commit(UserTurn(text="Weather in Rome?"), "", interrupted=True)  # no call kept
    result = ToolResult("call_x", "get_weather", "rain")
    server.mode = "stream"
    _events(session, UserTurn(text="", tool_results=(result,)))
    msgs = server.requests[-1]["messages"]
    assert msgs[-2]["tool_calls"][0]["id"] == "call_x"
    assert msgs[-1] == {"role": "tool", "tool_call_id": "call_x", "content": "rain"}
    session.close()


def test_scripted_tool_results_as_user_text(scripted: Any) -> None:
    """``tool_results: as_user_text``: the outputs (and any words of the turn) are one user
    message; the call stays in the assistant's message."""
    _, server = scripted
    server.mode = "stream"
    sets = {
        "engine.backend": "openai-compatible",
        "engine.model": "scripted",
        "engine.remote": {
            "base_url": server.base_url,
            "read_timeout_s": 5.0,
            "tool_results": "as_user_text",
        },
    }
    engine = OpenAICompatEngine(load_config("embedded", sets).engine)
    session = engine.new_session("You are helpful.", engine.cfg.sampling)
    session.set_tools((WEATHER_SPEC, TIME_SPEC), "auto")
    try:
        ask = UserTurn(text="Weather in Paris and time in Lima?")
        _events(session, ask)
        session.commit(ask, "Let me check.", interrupted=False)
        results = (
            ToolResult("c1", "get_weather", '{"sky": "sunny"}'),
            ToolResult("c2", "get_time", "09:00"),
        )
        back = UserTurn(text="", tool_results=results)
        _events(session, back)
        msgs = server.requests[-1]["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
        assert [c["id"] for c in msgs[2]["tool_calls"]] == ["call_w", "call_t"]
        assert msgs[3] == {
            "role": "user",
            "content": 'Result of get_weather: {"sky": "sunny"}\nResult of get_time: 09:00',
        }
        session.commit(back, "Sunny, and nine.", interrupted=False)
        _events(session, UserTurn(text="And tomorrow?", tool_results=results[:1]))
        assert server.requests[-1]["messages"][-1] == {
            "role": "user",
            "content": 'Result of get_weather: {"sky": "sunny"}\nAnd tomorrow?',
        }
    finally:
        session.close()
        engine.close()
    with pytest.raises(ConfigError, match="tool_results"):
        load_config("embedded", {"engine.remote": {"tool_results": "as_text"}})


def test_scripted_history_window_never_starts_at_a_tool_output(scripted: Any) -> None:
    _, server = scripted
    server.mode = "stream"
    sets = {
        "engine.backend": "openai-compatible",
        "engine.model": "scripted",
        "engine.history_turns": 1,
        "engine.remote": {"base_url": server.base_url, "read_timeout_s": 5.0},
    }
    engine = OpenAICompatEngine(load_config("embedded", sets).engine)
    session = engine.new_session("You are helpful.", engine.cfg.sampling)
    session.set_tools((WEATHER_SPEC, TIME_SPEC), "auto")
    try:
        ask = UserTurn(text="Weather in Paris and time in Lima?")
        _events(session, ask)
        session.commit(ask, "Let me check.", interrupted=False)
        back = UserTurn(
            text="",
            tool_results=(
                ToolResult("c1", "get_weather", "sunny"),
                ToolResult("c2", "get_time", "09:00"),
            ),
        )
        _events(session, back)
        session.commit(back, "Sunny, and nine.", interrupted=False)
        _events(session, UserTurn(text="Thanks."))
        roles = [m["role"] for m in server.requests[-1]["messages"]]
        # the last two messages would be a tool output and the answer: the window starts at
        # the user's words that led to the call
        assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "user"]
        session.commit(UserTurn(text="Thanks."), "You are welcome.", interrupted=False)
        _events(session, UserTurn(text="Bye."))
        roles = [m["role"] for m in server.requests[-1]["messages"]]
        assert roles == ["system", "user", "assistant", "user"], roles  # then one turn again
    finally:
        session.close()
        engine.close()
