"""The Step-Audio engine on CPU with tiny checkpoints in the real layout.

``bigram``: every layer's output projection is zero, so the next token depends only on the
current one; the chain ``\\n -> Hi -> " you" -> <|EOT|>`` makes every lane say "Hi you" and
stop. ``random``: plain random weights, for isolation, exactness and cancellation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from step_audio_fixtures import scripted, write_tiny_checkpoint

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.base import CancelToken, EngineSession, TokenEvent, UserTurn
from realtime.engine.step_audio import (
    StepAudioEngine,
    StepAudioOptions,
    build_step_audio_engine,
    chunked_embeddings,
    encode_piece,
    encoding_error,
)
from realtime.models.step_audio.lengths import CHUNK_SAMPLES, embeddings_for_samples
from realtime.models.step_audio.prompt import Conversation, Message, audio_slots

RATE = 16000


def _heard(s: Any, audio: np.ndarray) -> UserTurn:
    """The turn of ``audio``: what the session has not listened to yet is listened now."""
    s.listen(audio[s._l.audio.shape[0] :])
    return UserTurn()


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("bigram"), modify=scripted("Hi", " you"))


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("random"), seed=3)


def _engine(path: Path, **kw: object) -> StepAudioEngine:
    opts = kw.pop("opts", None)
    cfg = EngineConfig(backend="step-audio", model=str(path), device="cpu", max_context=512, **kw)
    return build_step_audio_engine(cfg, opts)  # type: ignore[arg-type]


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
    events = _events(s.respond(_heard(s, audio), CancelToken()))
    kinds = [e.kind for e in events]
    assert kinds[0] == "thinking" and "answer" in kinds
    assert _text(events, "thinking") == "Hi you"
    assert _text(events, "answer") == "Hi you"  # stopped at <|EOT|>, nothing after
    assert s.stats.wall_first_answer_token is not None and s.stats.thinking_tokens >= 2
    assert s.stats.generated_tokens <= 2 * 4  # two lanes, three words and <|EOT|> each
    assert engine.cache.free_slots == free - 1  # the speaking fork was given back
    s.commit(UserTurn(), "Hi you", interrupted=False)
    assert len(s.conv.turns) == 1
    _listen(s, _speech(0.7, seed=1))  # a second turn on top of the history
    assert _text(_events(s.respond(UserTurn(), CancelToken())), "answer") == "Hi you"
    s.close()
    assert engine.cache.free_slots == free


def test_budget_zero_and_think_first(bigram_dir: Path) -> None:
    engine = _engine(bigram_dir)
    s = engine.new_session("", SamplingConfig(think_budget=0))
    events = _events(s.respond(_heard(s, _speech(1.0)), CancelToken()))
    assert _text(events, "thinking") == "" and _text(events, "answer") == "Hi you"
    first = _engine(bigram_dir, opts=StepAudioOptions(speak_first=False))
    s2 = first.new_session("", SamplingConfig(think_budget=1))
    events = _events(s2.respond(_heard(s2, _speech(1.0)), CancelToken()))
    assert _text(events, "thinking") == "Hi"  # one reasoning token, then </think> is forced
    assert _text(events, "answer") == "Hi you"


def _tokens(engine: StepAudioEngine, audio: np.ndarray, listen: bool, n: int = 6) -> list[int]:
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=n))
    got: list[int] = []
    s.on_token = lambda role, tok, t: got.append(tok)
    if listen:
        _listen(s, audio, piece=0.16)
    list(s.respond(_heard(s, audio), CancelToken()))
    s.close()
    return got


def test_engine_and_session_do_what_the_worker_relies_on(random_dir: Path) -> None:
    """What the pipeline and the worker use: the engine's declared kind, warm-up, ``None`` items
    between steps, ``discard`` forgetting a partial turn, ``close`` giving the slot back."""
    engine = _engine(random_dir)
    assert (engine.name, engine.input_kind, engine.interleaved_responses) == (
        "step-audio",
        "audio",
        True,
    )
    engine.warmup()
    assert not engine.runner.lanes
    free = engine.cache.free_slots
    first, second = _speech(1.0, seed=1), _speech(1.3, seed=2)
    alone = _tokens(engine, second, listen=True)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=6))
    assert engine.cache.free_slots == free - 1
    got: list[int] = []
    s.on_token = lambda role, tok, t: got.append(tok)
    _listen(s, first, piece=0.16)
    items = list(s.respond(_heard(s, first), CancelToken()))
    assert len(got) == 6 and items.count(None) == 5  # a step boundary between tokens
    s.discard()  # a false start: forget the turn and its answer
    assert len(s.conv.turns) == 0 and s._l.audio.shape[0] == 0
    got.clear()
    _listen(s, second, piece=0.16)
    list(s.respond(_heard(s, second), CancelToken()))
    assert got == alone  # as if the first turn had never been heard
    s.close()
    assert engine.cache.free_slots == free and not engine.runner.lanes


def test_chunked_encoding_commits_each_pass_and_stays_close(random_dir: Path) -> None:
    """What listening commits, pass by pass, against the growing windows it encodes; and how far
    it is from the whole-utterance encoding (bounds measured on this tiny model: rel_l2 0.0373,
    worst embedding 0.0752, mean cosine 0.99928 at look-ahead 2; 0.0250 at look-ahead 8)."""
    engine = _engine(random_dir)
    model, chunk = engine.model, engine.chunk_samples
    audio = _speech(2.3, seed=5)
    whole = encode_piece(model, audio)
    got = chunked_embeddings(model, audio, chunk, lookahead=2)
    # passes at 0.64, 1.28 and 1.92 s see 8, 16 and 24 embeddings and commit all but 2 each
    ends = [chunk, 2 * chunk, 3 * chunk]
    assert [embeddings_for_samples(e) for e in ends] == [8, 16, 24]
    done = 0
    for end, keep in zip(ends, (6, 14, 22), strict=True):
        assert torch.equal(got[done:keep], encode_piece(model, audio[:end])[done:keep])
        done = keep
    assert torch.equal(got[22:], whole[22:]) and got.shape == whole.shape == (29, 32)
    # a look-ahead as long as the last pass's window commits nothing early: the whole encoding;
    # one less commits one embedding of that pass, which differs from the whole encoding
    assert torch.equal(chunked_embeddings(model, audio, chunk, lookahead=24), whole)
    short = chunked_embeddings(model, audio, chunk, lookahead=23)
    assert torch.equal(short[1:], whole[1:]) and not torch.equal(short[:1], whole[:1])
    err = encoding_error(model, audio, chunk, lookahead=2)
    print("chunked-vs-whole error", err)
    assert err["embeddings"] == 29
    assert 0.03 < err["rel_l2"] < 0.045
    assert 0.06 < err["max_rel_l2_per_embedding"] < 0.09
    assert err["mean_cosine"] > 0.999
    late = encoding_error(model, audio, chunk, lookahead=8)
    assert 0.02 < late["rel_l2"] < 0.03  # more look-ahead, less error


@pytest.mark.parametrize(("seconds", "budget", "chunk_ms"), [(2.3, 0, 640), (26.1, 4, 2560)])
def test_exact_encoding_answers_as_the_whole_utterance(
    random_dir: Path, seconds: float, budget: int, chunk_ms: int
) -> None:
    """``exact_encoding``: audio heard in many ``listen`` chunks is answered with the tokens of
    the same audio given whole; the turn's embeddings are the whole-piece encodings (26.1 s:
    two pieces, listened to in 2.56 s passes to keep the test short). Without it the listened
    embeddings differ (the control)."""
    audio = _speech(seconds, seed=5)
    modes = (True, False) if budget == 0 else (True,)
    for exact in modes:
        engine = _engine(random_dir, exact_encoding=exact, listen_chunk_ms=chunk_ms)
        spans = range(0, audio.shape[0], CHUNK_SAMPLES)
        whole = [encode_piece(engine.model, audio[a : a + CHUNK_SAMPLES]) for a in spans]
        runs = []
        for listen in (True, False):
            s = engine.new_session("sys", SamplingConfig(think_budget=budget, max_new_tokens=6))
            got: list[int] = []
            s.on_token = lambda role, tok, t, got=got: got.append(tok)
            if listen:
                _listen(s, audio, piece=0.16)
            list(s.respond(_heard(s, audio), CancelToken()))
            assert s._answered is not None
            runs.append((got, s._answered.pieces))
            s.close()
        (streamed, streamed_pieces), (given, given_pieces) = runs
        same = all(torch.equal(a, b) for a, b in zip(streamed_pieces, whole, strict=True))
        assert same == exact
        if exact:
            assert streamed == given and len(streamed) == 6 + min(budget, 6)
            assert all(torch.equal(a, b) for a, b in zip(given_pieces, whole, strict=True))
            exact_tokens = streamed
    # the reference: the whole prompt in one forward pass (the random model's tokens hardly
    # depend on the audio, so the logits of the prompt's last position are compared too)
    engine = _engine(random_dir, exact_encoding=True, listen_chunk_ms=chunk_ms)
    model = engine.model
    prompt = Conversation("sys").render(engine.builder, Message("human", audio_slots(len(audio))))
    ids = prompt.ids + (engine.think_close_ids if budget == 0 else [])
    if budget == 0:
        assert exact_tokens == model.generate_greedy(ids, torch.cat(whole), (), max_new_tokens=6)
    s = engine.new_session("sys", SamplingConfig(think_budget=budget))
    _listen(s, audio, piece=0.16)
    logits, gen_end = s._close_turn(_heard(s, audio))
    assert gen_end == len(ids)
    with torch.inference_mode():
        embeds = model.embed(torch.tensor([ids]), torch.cat(whole))
        positions = torch.arange(len(ids))[None]
        slots = torch.zeros(1, dtype=torch.long)
        ref = model(embeds, positions, model.new_cache(1, len(ids)), slots, last_only=True)
    torch.testing.assert_close(logits.reshape(-1), ref[0, -1], rtol=1e-4, atol=1e-4)


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
    it = s.respond(_heard(s, _speech(1.0)), cancel)
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
    list(b.respond(_heard(b, b_audio), CancelToken()))
    b.commit(UserTurn(), "fine", interrupted=False)
    list(a.respond(_heard(a, a_audio), CancelToken()))
    assert got == alone
    assert a.slot != b.slot


@torch.inference_mode()
def test_listening_prefill_matches_the_final_pass_for_committed_prefix(random_dir: Path) -> None:
    """What listening wrote is the prefix of what respond conditions on (no gap, no overlap),
    and the turn's embeddings are exactly :func:`chunked_embeddings` of its audio, whatever
    sizes the audio came in."""
    engine = _engine(random_dir)
    s = engine.new_session("", SamplingConfig(think_budget=0, max_new_tokens=1))
    audio = _speech(2.0)
    _listen(s, audio, piece=0.23)
    lst = s._l
    committed = torch.cat(lst.current)
    assert committed.shape[0] == lst.committed == lst.pos - lst.body_start - 1 == 22
    list(s.respond(_heard(s, audio), CancelToken()))
    assert s._answered is not None and len(s._answered.pieces) == 1
    turn = s._answered.pieces[0]
    assert turn.shape[0] == 25  # 2 s -> 25 embeddings in all
    assert torch.equal(turn[:22], committed)
    assert torch.equal(turn, chunked_embeddings(engine.model, audio, engine.chunk_samples, 2))


def test_reasoning_is_handed_to_the_speaker_at_sentence_ends(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "period", modify=scripted("Hi", ".", " you"))
    engine = _engine(path, opts=StepAudioOptions(refresh_tokens=1))
    s = engine.new_session("", SamplingConfig(think_budget=16, max_new_tokens=20))
    events = _events(s.respond(_heard(s, _speech(1.0)), CancelToken()))
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
    engine = _engine(path)
    assert engine.special.stop_ids == (151665, end)
    for budget in (0, 8):
        s = engine.new_session("", SamplingConfig(think_budget=budget, max_new_tokens=20))
        seen: list[tuple[str, int]] = []
        s.on_token = lambda role, tok, t, seen=seen: seen.append((role, tok))
        events = _events(s.respond(_heard(s, _speech(1.0)), CancelToken()))
        assert _text(events, "answer") == "Hi you"
        assert _text(events, "thinking") == ("Hi you" if budget else "")
        for role in {role for role, _ in seen}:
            assert [tok for r, tok in seen if r == role][2:] == [end]  # Hi, " you", the end
        s.close()


def test_answer_text_is_decoded_token_by_token(tmp_path: Path) -> None:
    """`` café`` is six byte-level tokens, ``é`` two of them: the answer streams whole
    characters, never half of one."""
    path = write_tiny_checkpoint(tmp_path / "cafe", modify=scripted("Hi", " café"))
    engine = _engine(path)
    s = engine.new_session("", SamplingConfig(think_budget=0))
    events = _events(s.respond(_heard(s, _speech(1.0)), CancelToken()))
    assert _text(events, "answer") == "Hi café"
    assert not any("\ufffd" in e.text for e in events)


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
    # opening the fourth turn found three: trimmed to one (half the window), then it was added
    assert len(s.conv.turns) == 2 and lengths[3] < lengths[2]
    s.listen(_speech(0.3))  # the fifth turn opens on the same cached prefix: no trim
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
    _round_robin(*(s.respond(_heard(s, au), CancelToken()) for s, au in sessions.values()))
    assert got == alone  # each answer is what it is alone
    taken = engine.steps.steps - steps
    assert taken < len(got["a"]) + len(got["b"])  # steps were shared, not taken one by one
    assert taken >= max(len(got["a"]), len(got["b"]))
    assert not engine.runner.lanes  # both answers left the runner


def test_audio_heard_while_answering_is_listened_after_the_answer(random_dir: Path) -> None:
    engine = _engine(random_dir)
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=6))
    _listen(s, _speech(1.0))
    it = s.respond(_heard(s, _speech(1.0)), CancelToken())
    next(it)  # the answer is under way: its lane sits on this session's slot
    pos, heard = s._l.pos, s._l.audio.shape[0]
    s.listen(_speech(0.7, seed=2))  # the caller talks over it (barge-in off)
    assert (s._l.pos, s._l.audio.shape[0]) == (pos, heard)  # nothing written over the answer
    list(it)
    assert s._l.audio.shape[0] == heard + int(0.7 * RATE)  # heard once the answer was done
