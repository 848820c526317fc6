"""Tools without a model: reading the engines' call payloads, validating declarations, and the
Realtime API's ``tools`` / ``tool_choice`` settings."""

from __future__ import annotations

import pytest

from realtime.engine.parser import ReasoningParser
from realtime.engine.tools import (
    ToolCallError,
    ToolSpec,
    argument_errors,
    parse_tool_calls,
    validate_tool,
)
from realtime.server import realtime_protocol as rp

WEATHER = ToolSpec(
    "get_weather",
    "weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.mark.parametrize(
    "payload",
    [
        'function\nget_weather\n{"city": "Paris"}',  # Step-Audio 2
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',  # Hermes / SmolLM
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # OpenAI string
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # a list of one
        'get_weather{"city":"Paris"}',
        '  get_weather\n {"city": "Paris"} ',
        # a call the model left unclosed runs on to the end of the answer
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n\nThe weather is',
    ],
)
def test_call_payloads_of_every_format(payload: str) -> None:
    (call,) = parse_tool_calls(payload)
    assert (call.name, call.arguments) == ("get_weather", '{"city":"Paris"}')
    assert argument_errors(WEATHER, call.arguments) == []


@pytest.mark.parametrize(
    "payload",
    ["", "{}", '{"name": 3}', "get weather now", 'get_weather{"city": ', 'f{"a": [1}'],
)
def test_unreadable_calls_are_errors(payload: str) -> None:
    with pytest.raises(ToolCallError):
        parse_tool_calls(payload)


def test_arguments_are_checked_against_the_schema() -> None:
    assert argument_errors(WEATHER, '{"town": "Paris"}') == ["'city' is a required property"]
    assert argument_errors(WEATHER, '{"city": 3}')
    assert argument_errors(WEATHER, "[1]") == ["the arguments are not a JSON object"]


def test_the_parser_splits_a_step_audio_call_from_speech() -> None:
    p = ReasoningParser(in_thinking=True)
    text = (
        "need the weather\n</think>\nLet me check.<tool_call>function\nget_weather\n"
        '{"city": "Paris"}</tool_call><|EOT|>'
    )
    events = [e for i in range(0, len(text), 3) for e in p.feed(text[i : i + 3])] + p.close()
    answer = "".join(e.text for e in events if e.kind == "answer")
    (call,) = [e.text for e in events if e.kind == "tool_call"]
    assert answer == "Let me check."  # the call is not spoken
    assert parse_tool_calls(call)[0].name == "get_weather"


def test_declarations_are_validated() -> None:
    spec = validate_tool(
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}, "t"
    )
    assert spec.name == "f" and spec.description == ""
    for bad, words in [
        ({"type": "web_search"}, "type must be 'function'"),
        ({"type": "function"}, "name must be"),
        ({"type": "function", "name": "f", "parameters": {"type": "string"}}, "'object'"),
        ({"type": "function", "name": "f", "parameters": {"properties": 1}}, "valid JSON schema"),
        ({"type": "function", "name": "f", "description": 2}, "description"),
    ]:
        with pytest.raises(ValueError, match=words):
            validate_tool(bad, "t")


def _settings() -> rp.Settings:
    return rp.Settings(model="m", instructions="", voice="v")


def test_session_update_tools_and_choice_round_trip() -> None:
    body = {"tools": [WEATHER.to_realtime()], "tool_choice": "required"}
    s = rp.parse_session_update(body, _settings(), {"v"})
    assert s.tools == (WEATHER,) and s.tool_choice == "required"
    for beta in (False, True):
        out = rp.session_json("sess", s, beta)
        assert out["tools"] == [WEATHER.to_realtime()] and out["tool_choice"] == "required"
    named = rp.parse_session_update(
        {"tool_choice": {"type": "function", "name": "get_weather"}}, s, {"v"}
    )
    assert rp.session_json("sess", named, False)["tool_choice"] == {
        "type": "function",
        "name": "get_weather",
    }
    # dropping the tools a choice names is refused; dropping both is fine
    with pytest.raises(rp.ClientError, match="no longer"):
        rp.parse_session_update({"tools": []}, named, {"v"})
    cleared = rp.parse_session_update({"tools": [], "tool_choice": "auto"}, named, {"v"})
    assert cleared.tools == () and cleared.tool_choice == "auto"


def test_the_responder_gives_calls_ids_and_refuses_undeclared_tools() -> None:
    from realtime.config import AgentConfig
    from realtime.context import SessionContext, SessionOptions, Tasks
    from realtime.frames import ErrorFrame, ToolCall
    from realtime.stages.responder import Responder

    ctx = SessionContext(
        SessionOptions(tools=(WEATHER,)), AgentConfig(), False, Tasks("t", lambda e: None)
    )
    responder = Responder(ctx, engine=None)  # type: ignore[arg-type]
    (a,) = responder._tool_calls(7, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert isinstance(a, ToolCall) and (a.response_id, a.name, a.arguments) == (
        7,
        "get_weather",
        '{"city":"Oslo"}',
    )
    assert a.call_id.startswith("call_")
    (other,) = responder._tool_calls(7, '{"name": "launch", "arguments": {}}')
    assert isinstance(other, ErrorFrame) and other.code == "invalid_tool_call"
    assert "not a declared tool ['get_weather']" in other.message
    (garbled,) = responder._tool_calls(7, "get weather please")
    assert isinstance(garbled, ErrorFrame) and "unreadable" in garbled.message
    ctx.options = SessionOptions(tools=(WEATHER,), tool_choice="none")
    (refused,) = responder._tool_calls(7, '{"name": "get_weather", "arguments": {}}')
    assert isinstance(refused, ErrorFrame) and "tool_choice is 'none'" in refused.message
    ctx.options = SessionOptions(tools=(WEATHER,))
    # every call gets its own id
    (c1,), (c2,) = (responder._tool_calls(1, 'get_weather{"city": "x"}') for _ in range(2))
    assert isinstance(c1, ToolCall) and isinstance(c2, ToolCall) and c1.call_id != c2.call_id
