"""The Step-Audio engine on CPU with tiny checkpoints in the real layout.

``bigram``: every layer's output projection is zero, so the next token depends only on the
current one; the chain ``\\n -> Hi -> " you" -> <|EOT|>`` makes every lane say "Hi you" and
stop. ``random``: plain random weights, for isolation, exactness and cancellation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.base import CancelToken, Engine, EngineSession, TokenEvent, UserTurn
from realtime.engine.step_audio import (
    StepAudioEngine,
    StepAudioOptions,
    build_step_audio_engine,
    encoding_error,
)
from realtime.models.step_audio.testing import scripted, write_tiny_checkpoint

RATE = 16000


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bigram"), modify=scripted("Hi", " you"))


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("random"), seed=3)


def _engine(path: Path, **kw: object) -> StepAudioEngine:
    opts = kw.pop("opts", None)
    cfg = EngineConfig(backend="step-audio", model=str(path), device="cpu", max_context=512, **kw)
    engine = build_step_audio_engine(cfg, opts)  # type: ignore[arg-type]
    assert isinstance(engine, Engine)
    return engine


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(3 * t)) * t)
    return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


def _listen(session: EngineSession, pcm: np.ndarray, piece: float = 0.2) -> None:
    step = int(piece * RATE)
    for i in range(0, pcm.shape[0], step):
        session.listen(pcm[i : i + step])


def _events(it: Iterator[TokenEvent | None]) -> list[TokenEvent]:
    """A whole answer's events (``None`` marks a step: the worker's cue to run other work)."""
    return [e for e in it if e is not None]


def _text(events: list[TokenEvent], kind: str) -> str:
    return "".join(e.text for e in events if e.kind == kind)


def test_listen_then_respond_thinks_then_answers_and_stops(bigram_dir: Path) -> None:
    engine = _engine(bigram_dir)
    free = engine.cache.free_slots
    s = engine.new_session("be brief", SamplingConfig(think_budget=8, max_new_tokens=20))
    assert engine.cache.free_slots == free - 1
    audio = _speech(1.5)
    _listen(s, audio)
    assert s._l.pos > 0 and s._l.committed > 0  # pre-filled while listening
    events = _events(s.respond(UserTurn(audio=audio), CancelToken()))
    kinds = [e.kind for e in events]
    assert kinds[0] == "thinking" and "answer" in kinds
    assert _text(events, "thinking") == "Hi you"
    assert _text(events, "answer") == "Hi you"  # stopped at <|EOT|>, nothing after
    assert s.stats.wall_first_answer_token is not None and s.stats.thinking_tokens >= 2
    assert s.stats.generated_tokens <= 2 * 4  # two lanes, three words and <|EOT|> each
    assert engine.cache.free_slots == free - 1  # the speaking fork was given back
    s.commit(UserTurn(audio=audio), "Hi you", interrupted=False)
    assert len(s.conv.turns) == 1
    _listen(s, _speech(0.7, seed=1))  # a second turn on top of the history
    assert _text(_events(s.respond(UserTurn(), CancelToken())), "answer") == "Hi you"
    s.close()
    assert engine.cache.free_slots == free


def test_budget_zero_and_think_first(bigram_dir: Path) -> None:
    engine = _engine(bigram_dir)
    s = engine.new_session("", SamplingConfig(think_budget=0))
    events = _events(s.respond(UserTurn(audio=_speech(1.0)), CancelToken()))
    assert _text(events, "thinking") == "" and _text(events, "answer") == "Hi you"
    first = _engine(bigram_dir, opts=StepAudioOptions(speak_first=False))
    s2 = first.new_session("", SamplingConfig(think_budget=1))
    events = _events(s2.respond(UserTurn(audio=_speech(1.0)), CancelToken()))
    assert _text(events, "thinking") == "Hi"  # one reasoning token, then </think> is forced
    assert _text(events, "answer") == "Hi you"


def _tokens(engine: StepAudioEngine, audio: np.ndarray, listen: bool, n: int = 6) -> list[int]:
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=n))
    got: list[int] = []
    s.on_token = lambda role, tok, t: got.append(tok)
    if listen:
        _listen(s, audio, piece=0.16)
    list(s.respond(UserTurn(audio=audio), CancelToken()))
    s.close()
    return got


def test_exact_mode_equals_whole_utterance_and_chunked_error(random_dir: Path) -> None:
    audio = _speech(2.3, seed=5)
    exact = _engine(random_dir, exact_encoding=True)
    whole = _tokens(exact, audio, listen=False)
    assert _tokens(exact, audio, listen=True) == whole
    chunked = _engine(random_dir, exact_encoding=False)
    assert _tokens(chunked, audio, listen=False) == whole  # nothing heard before: one pass
    err = encoding_error(chunked.model, audio, chunked.chunk_samples, lookahead=2)
    print("chunked-vs-whole error", err)
    assert err["embeddings"] == 29 and 0.0 <= err["rel_l2"] < 1.0 and err["mean_cosine"] > 0.5
    late = encoding_error(chunked.model, audio, chunked.chunk_samples, lookahead=8)
    assert late["rel_l2"] <= err["rel_l2"] + 1e-6  # more look-ahead, less error


def test_cancel_stops_within_one_step_and_frees_slots(random_dir: Path) -> None:
    engine = _engine(random_dir)
    free = engine.cache.free_slots
    s = engine.new_session("", SamplingConfig(think_budget=64, max_new_tokens=200))
    cancel = CancelToken()
    seen: list[int] = []

    def hook(role: str, tok: int, t: float) -> None:
        seen.append(tok)
        if len(seen) == 6:
            cancel.cancel()

    s.on_token = hook
    it = s.respond(UserTurn(audio=_speech(1.0)), cancel)
    list(it)
    assert 6 <= len(seen) <= 6 + 2  # the step in flight (two lanes) at most
    assert engine.cache.free_slots == free - 1 and not engine.runner.lanes
    # a cancelled speculative answer keeps the audio: more audio continues the same turn
    pos = s._l.pos
    s.listen(_speech(0.7, seed=2))
    assert s._l.pos > pos
    s.close()
    assert engine.cache.free_slots == free


def test_two_sessions_do_not_disturb_each_other(random_dir: Path) -> None:
    engine = _engine(random_dir)
    a_audio, b_audio = _speech(1.3, seed=7), _speech(1.9, seed=8)
    alone = _tokens(engine, a_audio, listen=True)
    a = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=6))
    b = engine.new_session("other", SamplingConfig(think_budget=4, max_new_tokens=6))
    got: list[int] = []
    a.on_token = lambda role, tok, t: got.append(tok)
    step = int(0.16 * RATE)
    for i in range(0, max(a_audio.shape[0], b_audio.shape[0]), step):
        if i < b_audio.shape[0]:
            b.listen(b_audio[i : i + step])
        if i < a_audio.shape[0]:
            a.listen(a_audio[i : i + step])
    list(b.respond(UserTurn(audio=b_audio), CancelToken()))
    b.commit(UserTurn(audio=b_audio), "fine", interrupted=False)
    list(a.respond(UserTurn(audio=a_audio), CancelToken()))
    assert got == alone
    assert a.slot != b.slot


@torch.inference_mode()
def test_listening_prefill_matches_the_final_pass_for_committed_prefix(random_dir: Path) -> None:
    """What listening wrote is the prefix of what respond conditions on (no gap, no overlap)."""
    engine = _engine(random_dir)
    s = engine.new_session("", SamplingConfig(think_budget=0, max_new_tokens=1))
    audio = _speech(2.0)
    _listen(s, audio, piece=0.64)
    lst = s._l
    committed = torch.cat(lst.current)
    assert committed.shape[0] == lst.committed == lst.pos - lst.body_start - 1
    list(s.respond(UserTurn(audio=audio), CancelToken()))
    assert s._answered is not None
    assert s._answered.pieces[0].shape[0] == 25  # 2 s -> 25 embeddings in all


def test_reasoning_is_handed_to_the_speaker_at_sentence_ends(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "period", modify=scripted("Hi", ".", " you"))
    engine = _engine(path, opts=StepAudioOptions(refresh_tokens=1))
    s = engine.new_session("", SamplingConfig(think_budget=16, max_new_tokens=20))
    events = _events(s.respond(UserTurn(audio=_speech(1.0)), CancelToken()))
    answer = _text(events, "answer")
    print("answer with hand-overs:", repr(answer), s.handovers)
    assert _text(events, "thinking") == "Hi. you"
    assert s.handovers >= 1 and answer.startswith("Hi.Hi.") and answer.endswith(" you")
    assert "think" not in answer


def test_typed_turn_and_history_rebuild(bigram_dir: Path) -> None:
    engine = _engine(bigram_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0))
    events = _events(s.respond(UserTurn(text="hello"), CancelToken()))
    assert _text(events, "answer") == "Hi you"
    s.commit(UserTurn(text="hello"), "Hi you", interrupted=False)
    s.listen(_speech(0.7))
    list(s.respond(UserTurn(), CancelToken()))
    s.commit(UserTurn(), "Hi", interrupted=True)
    hist = s._hist_len
    s._rebuild_history()  # re-fill from the stored text and audio embeddings
    assert s._hist_len == hist and s.conv.turns[0].user.parts == ("hello",)


def test_history_is_trimmed_to_history_turns(bigram_dir: Path) -> None:
    engine = _engine(bigram_dir, history_turns=2)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=4))
    lengths = []
    for i in range(4):
        s.listen(_speech(0.7, seed=i))
        list(s.respond(UserTurn(), CancelToken()))
        s.commit(UserTurn(), "Hi you", interrupted=False)
        lengths.append(s._hist_len)
    s.listen(_speech(0.3))  # opening the fifth turn trims to the last two
    assert len(s.conv.turns) == 2 and s._hist_len < lengths[-1]
    assert _text(_events(s.respond(UserTurn(), CancelToken())), "answer") == "Hi you"


def _round_robin(*its: Iterator[TokenEvent | None]) -> None:
    """Advance the answers one item at a time in turn, as the engine worker does."""
    live = list(its)
    while live:
        for it in list(live):
            if next(it, StopIteration) is StopIteration:
                live.remove(it)


def test_two_answers_at_once_share_each_step(random_dir: Path) -> None:
    engine = _engine(random_dir, max_batch=4)
    a_audio, b_audio = _speech(1.3, seed=7), _speech(1.9, seed=8)
    alone = {"a": _tokens(engine, a_audio, True, n=12), "b": _tokens(engine, b_audio, True, n=8)}
    got: dict[str, list[int]] = {"a": [], "b": []}
    sessions = {}
    for name, audio, n in (("a", a_audio, 12), ("b", b_audio, 8)):
        s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=n))
        s.on_token = lambda role, tok, t, name=name: got[name].append(tok)
        _listen(s, audio, piece=0.16)
        sessions[name] = (s, audio)
    steps = engine.steps.steps
    _round_robin(*(s.respond(UserTurn(audio=au), CancelToken()) for s, au in sessions.values()))
    assert got == alone  # each answer is what it is alone
    taken = engine.steps.steps - steps
    assert taken < len(got["a"]) + len(got["b"])  # steps were shared, not taken one by one
    assert taken >= max(len(got["a"]), len(got["b"]))
    assert not engine.runner.lanes  # both answers left the runner


def test_audio_heard_while_answering_is_listened_after_the_answer(random_dir: Path) -> None:
    engine = _engine(random_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=6))
    _listen(s, _speech(1.0))
    it = s.respond(UserTurn(audio=_speech(1.0)), CancelToken())
    next(it)  # the answer is under way: its lane sits on this session's slot
    pos, heard = s._l.pos, s._l.audio.shape[0]
    s.listen(_speech(0.7, seed=2))  # the caller talks over it (barge-in off)
    assert (s._l.pos, s._l.audio.shape[0]) == (pos, heard)  # nothing written over the answer
    list(it)
    assert s._l.audio.shape[0] == heard + int(0.7 * RATE)  # heard once the answer was done
