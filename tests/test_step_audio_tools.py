"""Tools on the Step-Audio engine (tiny CPU checkpoint): the schemas in their
``tool_json_schemas`` turn, a scripted call coming out as a ``tool_call`` event, the call kept
in the history, and the tool's output going back in the ``input`` role."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from step_audio_fixtures import (
    TOOL_CALL,
    TOOL_CALL_WORDS,
    cpu_engine,
    scripted,
    write_tiny_checkpoint,
)

from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken, TokenEvent, UserTurn
from realtime.engine.tools import ToolResult, ToolSpec, parse_tool_calls
from realtime.models.step_audio.prompt import Message

WEATHER = ToolSpec(
    "get_weather",
    "Current weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture(scope="module")
def caller_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("caller"), modify=scripted(*TOOL_CALL), words=TOOL_CALL_WORDS
    )


def _events(it) -> list[TokenEvent]:
    return [e for e in it if e is not None]


def test_a_scripted_call_comes_out_and_its_result_goes_back_as_input(caller_dir: Path) -> None:
    engine = cpu_engine(caller_dir, max_context=2048)  # the schemas take ~200 byte tokens
    s = engine.new_session("be brief", SamplingConfig(think_budget=0, max_new_tokens=20))
    s.set_tools((WEATHER,), "auto")
    events = _events(s.respond(UserTurn(text="hello"), CancelToken()))
    calls = [e.text for e in events if e.kind == "tool_call"]
    assert calls == ['get_weather{"city":"Paris"}']
    assert not "".join(e.text for e in events if e.kind == "answer").strip()  # nothing spoken
    assert [(c.name, c.arguments) for c in parse_tool_calls(calls[0])] == [
        ("get_weather", '{"city":"Paris"}')
    ]
    s.commit(UserTurn(text="hello"), "", interrupted=False)

    tok = engine.tok
    history = tok.decode(engine.builder.render(s.conv.messages(), False).ids)
    assert '<|BOT|>tool_json_schemas\n[{"type": "function", "function": {"name": "get_weather"' in (
        history
    )
    assert history.index("tool_json_schemas") < history.index("<|BOT|>human\nhello")
    assert history.endswith(
        '<|BOT|>assistant\n<think>\n\n</think>\n<tool_call>get_weather{"city":"Paris"}'
        "</tool_call><|EOT|>"
    )

    # the client returns the output: the next answer reads it in the ``input`` role
    result = ToolResult("call_1", "get_weather", '{"sky": "sunny"}')
    hist_len = s._hist_len
    written: list[tuple[int, torch.Tensor]] = []  # (cache position, embeddings) pre-filled
    real_prefill = engine.steps.prefill

    def prefill_spy(embeds, slot, start):
        written.append((start, embeds.clone()))
        return real_prefill(embeds, slot, start)

    engine.steps.prefill = prefill_spy
    try:
        events = _events(s.respond(UserTurn(tool_results=(result,)), CancelToken()))
    finally:
        engine.steps.prefill = real_prefill
    turn_ids = engine.builder.message(Message.text("input", '{"sky": "sunny"}')).ids
    expected = engine.embed_ids(
        turn_ids + engine.builder.generation_prompt().ids + engine.think_close_ids
    )
    # written right after the history, from the turn's <|BOT|> on (over the human header that
    # the turn opened with)
    assert any(p == hist_len and torch.equal(e, expected) for p, e in written), [
        (p, e.shape) for p, e in written
    ]
    assert [e.text for e in events if e.kind == "tool_call"]  # (the bigram calls again)
    s.commit(UserTurn(tool_results=(result,)), "", interrupted=False)
    history = tok.decode(engine.builder.render(s.conv.messages(), False).ids)
    turn2 = history[history.index("</tool_call><|EOT|>") :]
    assert turn2.startswith(
        '</tool_call><|EOT|><|BOT|>input\n{"sky": "sunny"}<|EOT|><|BOT|>assistant'
    )
    assert s._hist_len == len(engine.builder.render(s.conv.messages(), False).ids)
    s.close()


def test_tool_choice_none_leaves_the_schemas_out(caller_dir: Path) -> None:
    engine = cpu_engine(caller_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=4))
    s.set_tools((WEATHER,), "none")
    assert s.conv.tools == ""
    s.set_tools((WEATHER,), "auto")
    assert '"get_weather"' in s.conv.tools
    s.close()
