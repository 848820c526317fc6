from hypothesis import given
from hypothesis import strategies as st

from realtime.engine.parser import ReasoningParser


def run(chunks, in_thinking=False):
    p = ReasoningParser(in_thinking=in_thinking)
    events = [e for c in chunks for e in p.feed(c)] + p.close()
    joined: dict[str, str] = {}
    for e in events:
        joined[e.kind] = joined.get(e.kind, "") + e.text
    return joined, p


def split(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


STEP = "\nThe user asks for 2+2 < 5.\n</think>\nIt is <b>four</b>.<|EOT|>ignored"


def test_think_then_answer_stops_at_eot():
    out, p = run([STEP], in_thinking=True)
    assert out["thinking"] == "\nThe user asks for 2+2 < 5.\n"
    assert out["answer"] == "It is <b>four</b>."
    assert p.done


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_chunking_gives_the_same_split(cuts):
    out, _ = run(split(STEP, cuts), in_thinking=True)
    assert out == run([STEP], in_thinking=True)[0]


def test_empty_reasoning_and_plain_answers():
    out, _ = run(["<think>\n\n</think>\n", "Paris."])
    assert out.get("answer") == "Paris." and out.get("thinking", "").strip() == ""
    out, _ = run(["Just ", "an answer <3"])
    assert out == {"answer": "Just an answer <3"}


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_tool_calls_are_surfaced_not_spoken(cuts):
    text = 'Let me check.<|CALL_START|>{"name": "weather"}<|CALL_END|> It is sunny.'
    out, _ = run(split(text, cuts))
    assert out["tool_call"] == '{"name": "weather"}'
    assert out["answer"] == "Let me check. It is sunny."
