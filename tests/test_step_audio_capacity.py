"""Capacity and the random-weights benchmark path of the Step-Audio engine, on the tiny
checkpoint: a forced answer text, a clear busy error when no cache slot is free, the
think-first fallback counted, and a busy server answering a newcomer with an error event."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import websockets
from server_helpers import start_server
from step_audio_fixtures import (
    cpu_engine,
    write_tiny_checkpoint,
)

from realtime.config import SamplingConfig, ServerConfig, load_config
from realtime.engine.base import CancelToken, EngineBusy, UserTurn
from realtime.engine.step_audio import StepAudioOptions

RATE = 16000
FORCED = "This is a fixed answer. Ask me again, please."


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("random"), seed=5)


def _answer(session) -> str:
    session.listen(0.1 * np.random.default_rng(0).standard_normal(RATE).astype(np.float32))
    events = [e for e in session.respond(UserTurn(), CancelToken()) if e is not None]
    return "".join(e.text for e in events if e.kind == "answer")


@pytest.mark.parametrize("budget", [0, 6])
def test_a_forced_answer_is_spoken_word_for_word(random_dir, budget):
    """Random weights write no words; with ``forced_answer`` the speaking lane is fed the
    text's tokens (every step still runs), so the TTS gets real words."""
    engine = cpu_engine(random_dir, forced_answer=FORCED, max_batch=2)
    plain = cpu_engine(random_dir, max_batch=2)
    s = engine.new_session("sys", SamplingConfig(think_budget=budget, max_new_tokens=200))
    assert _answer(s).strip() == FORCED
    if budget:  # the reasoning lane still ran (on random tokens) beside it, to its budget
        assert s.stats.thinking_tokens == budget
        # and was handed to the speaking lane (an injection queued before its next step), and
        # the forced words went on after it
        assert s.handovers >= 1
        assert engine.counters["prefill_passes_injection"] >= s.handovers  # on /metrics
    p = plain.new_session("sys", SamplingConfig(think_budget=budget, max_new_tokens=40))
    assert _answer(p).strip() != FORCED  # without it, the model's own (random) tokens


@pytest.mark.parametrize(("budget", "in_step"), [(0, False), (6, False), (6, True)])
def test_forced_answers_of_callers_answered_together_stay_word_for_word(
    random_dir, budget, in_step
):
    """The worker hands out one event of a caller's answer, then goes on with another
    caller's, whose next token may be a new step: each forced text must reach its step all
    the same (a step run between a caller's token and its force fed that lane what it
    sampled, and callers heard bytes of random tokens in the middle of the text)."""
    engine = cpu_engine(random_dir, forced_answer=FORCED, max_batch=16, prefill_in_step=in_step)
    sampling = SamplingConfig(think_budget=budget, max_new_tokens=200)
    sessions = [engine.new_session("sys", sampling) for _ in range(3)]
    answers = []
    for i, s in enumerate(sessions):
        pcm = 0.1 * np.random.default_rng(i).standard_normal(RATE).astype(np.float32)
        s.listen(pcm)
        answers.append(s.respond(UserTurn(), CancelToken()))
    texts = [""] * len(answers)
    live = set(range(len(answers)))
    while live:
        for i in sorted(live):  # one item each in turn, as the worker's shared streams
            try:
                ev = next(answers[i])
            except StopIteration:
                live.discard(i)
                continue
            if ev is not None and ev.kind == "answer":
                texts[i] += ev.text
    assert [t.strip() for t in texts] == [FORCED] * len(answers)
    assert engine.steps.steps < sum(s.stats.generated_tokens for s in sessions)  # shared steps


def test_no_free_slot_is_a_busy_error_and_counted(random_dir):
    engine = cpu_engine(random_dir, max_batch=1)
    first = engine.new_session("sys", SamplingConfig())
    with pytest.raises(EngineBusy, match="cache sequences"):
        engine.new_session("sys", SamplingConfig())
    assert engine.counters["sessions_refused"] == 1
    first.close()
    engine.new_session("sys", SamplingConfig()).close()  # the slot came back


def test_without_a_slot_for_the_fork_the_answer_thinks_first_and_is_counted(random_dir):
    engine = cpu_engine(random_dir, max_batch=1, forced_answer=FORCED)
    s = engine.new_session("sys", SamplingConfig(think_budget=4, max_new_tokens=200))
    assert _answer(s).strip() == FORCED
    assert engine.counters["think_first_fallbacks"] == 1 and s.stats.thinking_tokens == 4


def test_a_think_first_fallback_thinks_briefly_not_the_whole_budget(random_dir):
    """Without a slot for the fork, the caller hears an answer after a short reasoning block,
    not after the whole think budget."""
    opts = StepAudioOptions(think_first_budget=3)
    engine = cpu_engine(random_dir, max_batch=1, forced_answer=FORCED, opts=opts)
    s = engine.new_session("sys", SamplingConfig(think_budget=40, max_new_tokens=200))
    assert _answer(s).strip() == FORCED
    assert engine.counters["think_first_fallbacks"] == 1 and s.stats.thinking_tokens == 3


async def test_a_full_engine_answers_a_new_caller_with_busy(random_dir, tmp_path):
    from realtime.runtime import Runtime

    cfg = load_config(
        "step-audio-r1",
        {
            "engine.model": str(random_dir),
            "engine.device": "cpu",
            "engine.dtype": "float32",
            "engine.max_batch": 1,
            "engine.max_context": 512,
            "tts.backend": "espeak",
        },
    )
    runtime = await Runtime.create(cfg)
    server = await start_server(runtime, ServerConfig(max_sessions=4))
    try:
        async with websockets.connect(f"{server.ws}/v1/realtime") as first:
            assert json.loads(await first.recv())["type"] == "session.created"
            async with websockets.connect(f"{server.ws}/v1/realtime") as second:
                event = json.loads(await asyncio.wait_for(second.recv(), 30))
                assert event["type"] == "error", event
                assert "busy" in event["error"]["message"]
                assert event["error"]["code"] == "server_busy"
            metrics = await asyncio.to_thread(_get, f"{server.http}/metrics")
            assert 'agent_engine_events{event="sessions_refused"} 1.0' in metrics
            assert 'agent_sessions_rejected_total{reason="engine_busy"} 1.0' in metrics
            # what the engine holds: its one cache slot, taken by the first caller
            assert 'agent_engine{stat="kv_slots_total"} 1.0' in metrics
            assert 'agent_engine{stat="kv_slots_used"} 1.0' in metrics
            assert 'agent_engine{stat="kv_positions_used"} 0.0' not in metrics  # the prompt
        for _ in range(100):  # the server closes the first session once it sees the close
            if not runtime.sessions:
                break
            await asyncio.sleep(0.05)
        assert len(runtime.sessions) == 0  # and the refused one left nothing behind
    finally:
        await server.runner.cleanup()
        await runtime.close()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_a_turn_committed_while_its_answer_hands_out_an_event_ends_quietly(random_dir):
    """A barge-in cancels the answer and the turn is committed (on the engine thread, between
    two items of the answer's generator): the generator, resumed, must end without touching
    the lanes the commit took off the runner."""
    engine = cpu_engine(random_dir, forced_answer=FORCED, max_batch=2)
    s = engine.new_session("sys", SamplingConfig(think_budget=8, max_new_tokens=200))
    s.listen(0.1 * np.random.default_rng(1).standard_normal(RATE).astype(np.float32))
    cancel = CancelToken()
    it = s.respond(UserTurn(), cancel)
    first = next(e for e in it if e is not None)  # suspended inside a step, mid-events
    assert first.kind == "answer"
    cancel.cancel()
    s.commit(UserTurn(), first.text, interrupted=True)
    assert list(it) == []  # ends at once, no KeyError from a lane that is gone
    assert not engine.runner.lanes and engine.cache.free_slots == 1
    assert _answer(s).strip() == FORCED  # and the next turn is answered


async def test_silence_between_turns_never_reaches_the_audio_engine(random_dir, say):
    """Only the turn's audio (from the speech-start padding on) is pre-filled: half a minute
    of silence before a question adds nothing to the cache or the encoder's window."""
    from realtime.runtime import Runtime

    cfg = load_config(
        "step-audio-r1",
        {
            "engine.model": str(random_dir),
            "engine.device": "cpu",
            "engine.dtype": "float32",
            "engine.max_context": 512,
            "tts.backend": "espeak",
        },
    )
    runtime = await Runtime.create(cfg, warmup=False)
    try:
        session = runtime.new_session(pace_output=False)
        await session.start()
        question = say("What is the weather like?", lead_s=0.0, tail_s=0.0)
        audio = np.concatenate([np.zeros(30 * RATE, np.float32), question])
        for i in range(0, len(audio), 3200):
            await session.push_audio(audio[i : i + 3200], RATE)
        await runtime.worker.call(lambda: None)  # the queued listen jobs have run
        heard = session.engine.session._l.audio.shape[0] / RATE
        pad = session.options.vad.prefix_padding_ms / 1000
        assert len(question) / RATE - 0.2 < heard <= len(question) / RATE + pad + 0.05, heard
        await session.close()
    finally:
        await runtime.close()
