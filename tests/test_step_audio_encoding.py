"""The Step-Audio engine's listening encoder on CPU (tiny checkpoint, random weights): the
growing-window passes commit the same embeddings as the final pass, stay close to the
whole-utterance encoding, and with ``exact_encoding`` answer exactly as the whole utterance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from step_audio_fixtures import (
    cpu_engine,
    heard,
    listen_in_pieces,
    speechlike,
    write_tiny_checkpoint,
)

from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken
from realtime.engine.step_audio import chunked_embeddings, encode_piece, encoding_error
from realtime.models.step_audio.lengths import CHUNK_SAMPLES, embeddings_for_samples
from realtime.models.step_audio.prompt import Conversation, Message, audio_slots


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("random"), seed=3)


def test_chunked_encoding_commits_each_pass_and_stays_close(random_dir: Path) -> None:
    """What listening commits, pass by pass, against the growing windows it encodes; and how far
    it is from the whole-utterance encoding (bounds measured on this tiny model: rel_l2 0.0373,
    worst embedding 0.0752, mean cosine 0.99928 at look-ahead 2; 0.0250 at look-ahead 8)."""
    engine = cpu_engine(random_dir)
    model, chunk = engine.model, engine.chunk_samples
    audio = speechlike(2.3, seed=5)
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
    audio = speechlike(seconds, seed=5)
    modes = (True, False) if budget == 0 else (True,)
    for exact in modes:
        engine = cpu_engine(random_dir, exact_encoding=exact, listen_chunk_ms=chunk_ms)
        spans = range(0, audio.shape[0], CHUNK_SAMPLES)
        whole = [encode_piece(engine.model, audio[a : a + CHUNK_SAMPLES]) for a in spans]
        runs = []
        for listen in (True, False):
            s = engine.new_session("sys", SamplingConfig(think_budget=budget, max_new_tokens=6))
            got: list[int] = []
            s.on_token = lambda role, tok, t, got=got: got.append(tok)
            if listen:
                listen_in_pieces(s, audio, piece=0.16)
            list(s.respond(heard(s, audio), CancelToken()))
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
    engine = cpu_engine(random_dir, exact_encoding=True, listen_chunk_ms=chunk_ms)
    model = engine.model
    prompt = Conversation("sys").render(engine.builder, Message("human", audio_slots(len(audio))))
    ids = prompt.ids + (engine.think_close_ids if budget == 0 else [])
    if budget == 0:
        assert exact_tokens == model.generate_greedy(ids, torch.cat(whole), (), max_new_tokens=6)
    s = engine.new_session("sys", SamplingConfig(think_budget=budget))
    listen_in_pieces(s, audio, piece=0.16)
    logits, gen_end = s._close_turn(heard(s, audio))
    assert gen_end == len(ids)
    with torch.inference_mode():
        embeds = model.embed(torch.tensor([ids]), torch.cat(whole))
        positions = torch.arange(len(ids))[None]
        slots = torch.zeros(1, dtype=torch.long)
        ref = model(embeds, positions, model.new_cache(1, len(ids)), slots, last_only=True)
    torch.testing.assert_close(logits.reshape(-1), ref[0, -1], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_listening_prefill_matches_the_final_pass_for_committed_prefix(random_dir: Path) -> None:
    """What listening wrote is the prefix of what respond conditions on (no gap, no overlap),
    and the turn's embeddings are exactly :func:`chunked_embeddings` of its audio, whatever
    sizes the audio came in."""
    engine = cpu_engine(random_dir)
    s = engine.new_session("", SamplingConfig(think_budget=0, max_new_tokens=1))
    audio = speechlike(2.0)
    listen_in_pieces(s, audio, piece=0.23)
    lst = s._l
    committed = torch.cat(lst.current)
    assert committed.shape[0] == lst.committed == lst.pos - lst.body_start - 1 == 22
    list(s.respond(heard(s, audio), CancelToken()))
    assert s._answered is not None and len(s._answered.pieces) == 1
    turn = s._answered.pieces[0]
    assert turn.shape[0] == 25  # 2 s -> 25 embeddings in all
    assert torch.equal(turn[:22], committed)
    assert torch.equal(turn, chunked_embeddings(engine.model, audio, engine.chunk_samples, 2))
