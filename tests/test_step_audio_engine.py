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
from step_audio_fixtures import (
    cpu_engine,
    heard,
    listen_in_pieces,
    scripted,
    speechlike,
    write_tiny_checkpoint,
)

from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken, TokenEvent, UserTurn
from realtime.engine.step_audio import (
    StepAudioEngine,
    StepAudioOptions,
)

RATE = 16000


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bigram"), modify=scripted("Hi", " you"))


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("random"), seed=3)


def _events(it: Iterator[TokenEvent | None]) -> list[TokenEvent]:
    """A whole answer's events (``None`` marks a step: the worker's cue to run other work)."""
    return [e for e in it if e is not None]


def _text(events: list[TokenEvent], kind: str) -> str:
    return "".join(e.text for e in events if e.kind == kind)


def test_listen_then_respond_thinks_then_answers_and_stops(bigram_dir: Path) -> None:
    engine = cpu_engine(bigram_dir)
    free = engine.cache.free_slots
    s = engine.new_session("be brief", SamplingConfig(think_budget=8, max_new_tokens=20))
    assert engine.cache.free_slots == free - 1
    audio = speechlike(1.5)
    listen_in_pieces(s, audio)
    assert s._l.pos > 0 and s._l.committed > 0  # pre-filled while listening
    events = _events(s.respond(heard(s, audio), CancelToken()))
    kinds = [e.kind for e in events]
    assert kinds[0] == "thinking" and "answer" in kinds
    assert _text(events, "thinking") == "Hi you"
    assert _text(events, "answer") == "Hi you"  # stopped at <|EOT|>, nothing after
    assert s.stats.wall_first_answer_token is not None and s.stats.thinking_tokens >= 2
    assert s.stats.generated_tokens <= 2 * 4  # two lanes, three words and <|EOT|> each
    assert engine.cache.free_slots == free - 1  # the speaking fork was given back
    s.commit(UserTurn(), "Hi you", interrupted=False)
    assert len(s.conv.turns) == 1
    listen_in_pieces(s, speechlike(0.7, seed=1))  # a second turn on top of the history
    assert _text(_events(s.respond(UserTurn(), CancelToken())), "answer") == "Hi you"
    s.close()
    assert engine.cache.free_slots == free


def test_budget_zero_and_think_first(bigram_dir: Path) -> None:
    engine = cpu_engine(bigram_dir)
    s = engine.new_session("", SamplingConfig(think_budget=0))
    events = _events(s.respond(heard(s, speechlike(1.0)), CancelToken()))
    assert _text(events, "thinking") == "" and _text(events, "answer") == "Hi you"
    first = cpu_engine(bigram_dir, opts=StepAudioOptions(speak_first=False))
    s2 = first.new_session("", SamplingConfig(think_budget=1))
    events = _events(s2.respond(heard(s2, speechlike(1.0)), CancelToken()))
    assert _text(events, "thinking") == "Hi"  # one reasoning token, then </think> is forced
    assert _text(events, "answer") == "Hi you"


def _tokens(engine: StepAudioEngine, audio: np.ndarray, listen: bool, n: int = 6) -> list[int]:
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=n))
    got: list[int] = []
    s.on_token = lambda role, tok, t: got.append(tok)
    if listen:
        listen_in_pieces(s, audio, piece=0.16)
    list(s.respond(heard(s, audio), CancelToken()))
    s.close()
    return got


def test_engine_and_session_do_what_the_worker_relies_on(random_dir: Path) -> None:
    """What the pipeline and the worker use: the engine's declared kind, warm-up, ``None`` items
    between steps, ``discard`` forgetting a partial turn, ``close`` giving the slot back."""
    engine = cpu_engine(random_dir)
    assert (engine.name, engine.input_kind, engine.interleaved_responses) == (
        "step-audio",
        "audio",
        True,
    )
    engine.warmup()
    assert not engine.runner.lanes
    free = engine.cache.free_slots
    first, second = speechlike(1.0, seed=1), speechlike(1.3, seed=2)
    alone = _tokens(engine, second, listen=True)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=6))
    assert engine.cache.free_slots == free - 1
    got: list[int] = []
    s.on_token = lambda role, tok, t: got.append(tok)
    listen_in_pieces(s, first, piece=0.16)
    items = list(s.respond(heard(s, first), CancelToken()))
    # one item gives way while the turn's pre-fill waits for its pass, then a step boundary
    # between tokens
    assert len(got) == 6 and items.count(None) == 1 + 5
    s.discard()  # a false start: forget the turn and its answer
    assert len(s.conv.turns) == 0 and s._l.audio.shape[0] == 0
    got.clear()
    listen_in_pieces(s, second, piece=0.16)
    list(s.respond(heard(s, second), CancelToken()))
    assert got == alone  # as if the first turn had never been heard
    s.close()
    assert engine.cache.free_slots == free and not engine.runner.lanes


def test_cancel_stops_within_one_step_and_frees_slots(random_dir: Path) -> None:
    engine = cpu_engine(random_dir)
    free = engine.cache.free_slots
    s = engine.new_session("", SamplingConfig(think_budget=64, max_new_tokens=200))
    cancel = CancelToken()
    seen: list[int] = []

    def hook(role: str, tok: int, t: float) -> None:
        seen.append(tok)
        if len(seen) == 6:
            cancel.cancel()

    s.on_token = hook
    it = s.respond(heard(s, speechlike(1.0)), cancel)
    list(it)
    assert 6 <= len(seen) <= 6 + 2  # the step in flight (two lanes) at most
    assert engine.cache.free_slots == free - 1 and not engine.runner.lanes
    # a cancelled speculative answer keeps the audio: more audio continues the same turn
    pos = s._l.pos
    s.listen(speechlike(0.7, seed=2))
    assert s._l.pos > pos
    s.close()
    assert engine.cache.free_slots == free


def test_two_sessions_do_not_disturb_each_other(random_dir: Path) -> None:
    engine = cpu_engine(random_dir)
    a_audio, b_audio = speechlike(1.3, seed=7), speechlike(1.9, seed=8)
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
    list(b.respond(heard(b, b_audio), CancelToken()))
    b.commit(UserTurn(), "fine", interrupted=False)
    list(a.respond(heard(a, a_audio), CancelToken()))
    assert got == alone
    assert a.slot != b.slot


def test_reasoning_is_handed_to_the_speaker_at_sentence_ends(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "period", modify=scripted("Hi", ".", " you"))
    engine = cpu_engine(path, opts=StepAudioOptions(refresh_tokens=1))
    s = engine.new_session("", SamplingConfig(think_budget=16, max_new_tokens=20))
    events = _events(s.respond(heard(s, speechlike(1.0)), CancelToken()))
    answer = _text(events, "answer")
    print("answer with hand-overs:", repr(answer), s.handovers)
    assert _text(events, "thinking") == "Hi. you"
    assert s.handovers >= 1 and answer.startswith("Hi.Hi.") and answer.endswith(" you")
    assert "think" not in answer


@pytest.mark.parametrize(
    ("listed", "end"), [((151643, 151665), 151643), ((151665, 151693), 151693)]
)
def test_a_lane_stops_at_every_stop_id_the_checkpoint_lists(
    tmp_path: Path, listed: tuple[int, int], end: int
) -> None:
    """``generation_config.json`` lists two stop ids; the model ends its answer with the one that
    is not ``<|EOT|>``. 151643 is Step-Audio-R1's ``<|endoftext|>``; 151693 (``<tts_start>``) is
    no end marker for the text parser, so only the checkpoint's list can stop a lane there."""
    path = write_tiny_checkpoint(
        tmp_path / "stop", modify=scripted("Hi", " you", end=end), stop_ids=listed
    )
    engine = cpu_engine(path)
    assert engine.special.stop_ids == (151665, end)
    for budget in (0, 8):
        s = engine.new_session("", SamplingConfig(think_budget=budget, max_new_tokens=20))
        seen: list[tuple[str, int]] = []
        s.on_token = lambda role, tok, t, seen=seen: seen.append((role, tok))
        events = _events(s.respond(heard(s, speechlike(1.0)), CancelToken()))
        assert _text(events, "answer") == "Hi you"
        assert _text(events, "thinking") == ("Hi you" if budget else "")
        for role in {role for role, _ in seen}:
            assert [tok for r, tok in seen if r == role][2:] == [end]  # Hi, " you", the end
        s.close()


def test_answer_text_is_decoded_token_by_token(tmp_path: Path) -> None:
    """`` café`` is six byte-level tokens, ``é`` two of them: the answer streams whole
    characters, never half of one."""
    path = write_tiny_checkpoint(tmp_path / "cafe", modify=scripted("Hi", " café"))
    engine = cpu_engine(path)
    s = engine.new_session("", SamplingConfig(think_budget=0))
    events = _events(s.respond(heard(s, speechlike(1.0)), CancelToken()))
    assert _text(events, "answer") == "Hi café"
    assert not any("\ufffd" in e.text for e in events)


def test_typed_turn_and_history_rebuild(bigram_dir: Path) -> None:
    engine = cpu_engine(bigram_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0))
    events = _events(s.respond(UserTurn(text="hello"), CancelToken()))
    assert _text(events, "answer") == "Hi you"
    s.commit(UserTurn(text="hello"), "Hi you", interrupted=False)
    s.listen(speechlike(0.7))
    list(s.respond(UserTurn(), CancelToken()))
    s.commit(UserTurn(), "Hi", interrupted=True)
    hist = s._hist_len
    s._rebuild_history()  # re-fill from the stored text and audio embeddings
    assert s._hist_len == hist and s.conv.turns[0].user.parts == ("hello",)


def test_words_that_come_with_the_speech_are_in_the_turn(bigram_dir: Path) -> None:
    """Text sent with a spoken turn (a typed message, a keypad key) follows the audio in the
    user's turn: in the cache as in the history that is re-filled from it."""
    engine = cpu_engine(bigram_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=4))
    s.listen(speechlike(0.7))
    turn = UserTurn(text="hello there")
    list(s.respond(turn, CancelToken()))
    s.commit(turn, "Hi", interrupted=False)
    user = s.conv.turns[0].user
    assert user.parts[-1] == "hello there" and len(user.parts) == 2
    hist = s._hist_len
    s._rebuild_history()  # the history as ids: the same length, so the words were in the cache
    assert s._hist_len == hist
    alone = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=4))
    alone.listen(speechlike(0.7))
    list(alone.respond(UserTurn(), CancelToken()))
    alone.commit(UserTurn(), "Hi", interrupted=False)
    assert hist - alone._hist_len == len(engine.text_ids("hello there"))


def test_history_is_trimmed_to_history_turns(bigram_dir: Path) -> None:
    engine = cpu_engine(bigram_dir, history_turns=2)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=4))
    lengths = []
    for i in range(4):
        s.listen(speechlike(0.7, seed=i))
        list(s.respond(UserTurn(), CancelToken()))
        s.commit(UserTurn(), "Hi you", interrupted=False)
        lengths.append(s._hist_len)
    # opening the fourth turn found three: trimmed to one (half the window), then it was added
    assert len(s.conv.turns) == 2 and lengths[3] < lengths[2]
    s.listen(speechlike(0.3))  # the fifth turn opens on the same cached prefix: no trim
    assert len(s.conv.turns) == 2 and s._l.body_start > lengths[3]  # opened after it
    assert _text(_events(s.respond(UserTurn(), CancelToken())), "answer") == "Hi you"


def _round_robin(*its: Iterator[TokenEvent | None]) -> None:
    """Advance the answers one item at a time in turn, as the engine worker does."""
    live = list(its)
    while live:
        for it in list(live):
            if next(it, StopIteration) is StopIteration:
                live.remove(it)


def test_two_answers_at_once_share_each_step(random_dir: Path) -> None:
    engine = cpu_engine(random_dir, max_batch=4)
    a_audio, b_audio = speechlike(1.3, seed=7), speechlike(1.9, seed=8)
    alone = {"a": _tokens(engine, a_audio, True, n=12), "b": _tokens(engine, b_audio, True, n=8)}
    got: dict[str, list[int]] = {"a": [], "b": []}
    sessions = {}
    for name, audio, n in (("a", a_audio, 12), ("b", b_audio, 8)):
        s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=n))
        s.on_token = lambda role, tok, t, name=name: got[name].append(tok)
        listen_in_pieces(s, audio, piece=0.16)
        sessions[name] = (s, audio)
    steps = engine.steps.steps
    _round_robin(*(s.respond(heard(s, au), CancelToken()) for s, au in sessions.values()))
    assert got == alone  # each answer is what it is alone
    taken = engine.steps.steps - steps
    assert taken < len(got["a"]) + len(got["b"])  # steps were shared, not taken one by one
    assert taken >= max(len(got["a"]), len(got["b"]))
    assert not engine.runner.lanes  # both answers left the runner


def test_audio_heard_while_answering_is_listened_after_the_answer(random_dir: Path) -> None:
    engine = cpu_engine(random_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=6))
    listen_in_pieces(s, speechlike(1.0))
    it = s.respond(heard(s, speechlike(1.0)), CancelToken())
    next(it)  # the answer is under way: its lane sits on this session's slot
    pos, before = s._l.pos, s._l.audio.shape[0]
    s.listen(speechlike(0.7, seed=2))  # the caller talks over it (barge-in off)
    assert (s._l.pos, s._l.audio.shape[0]) == (pos, before)  # nothing written over the answer
    list(it)
    assert s._l.audio.shape[0] == before + int(0.7 * RATE)  # heard once the answer was done


def test_new_instructions_apply_from_the_next_turn(bigram_dir: Path) -> None:
    """``session.update(instructions=...)`` on the Step-Audio engine: the history is re-filled
    under the new system prompt when the next turn opens (it used to be ignored)."""
    engine = cpu_engine(bigram_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=4))
    listen_in_pieces(s, speechlike(0.7))
    list(s.respond(UserTurn(), CancelToken()))
    s.commit(UserTurn(), "Hi you", interrupted=False)
    before = s._hist_len
    s.set_instructions("You answer in one word, always.")
    assert s._hist_len == before  # nothing changes mid-conversation until the next turn
    listen_in_pieces(s, speechlike(0.5, seed=2))
    prompt = engine.builder.render(s.conv.messages(), add_generation_prompt=False)
    assert s._hist_len == len(prompt.ids) > before
    assert "one word, always" in engine.tok.decode(prompt.ids)
    assert _text(_events(s.respond(UserTurn(), CancelToken())), "answer") == "Hi you"
