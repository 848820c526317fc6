"""Batched pre-fill (realtime/models/prefill.py ``prefill_batch``) and the scheduler's queue of
pieces (realtime/engine/scheduler.py): several sequences' pieces in one pass write what
one-by-one pre-fills write; callers' listening chunks share passes and their answers are
those they get alone; a discarded turn's queued pieces never reach the cache."""

from __future__ import annotations

import dataclasses
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
from realtime.engine.base import CancelToken, UserTurn
from realtime.models.decode import DecodeRunner, LaneSampling, Rider
from realtime.models.kv_pages import PagedKVCache
from realtime.models.qwen2 import KVCache
from tests.test_decode_runner import CFG, _model
from tests.test_kv_pages import OPTS

# (slot, start, length): pieces after earlier context, of different lengths, across page edges
PIECES = [(0, 10, 5), (1, 3, 8), (2, 20, 1), (3, 0, 13)]


def _cache(kind: str) -> KVCache:
    if kind == "paged":
        return PagedKVCache(CFG, 4, 64, "cpu", torch.float32, page_size=8, num_pages=32)
    return KVCache(CFG, 4, 64, "cpu", torch.float32)


def _prefixes(runner: DecodeRunner, model: torch.nn.Module) -> None:
    """The same earlier context in every cache: ``start`` positions of each slot."""
    gen = torch.Generator().manual_seed(3)
    for slot, start, _ in PIECES:
        assert runner.cache.allocate(1) == [slot]
        if start:
            runner.prefill(model.embed(torch.randint(0, 101, (start,), generator=gen)), slot, 0)


@pytest.mark.parametrize("kind", ["fixed", "paged"])
@torch.no_grad()
def test_one_batched_pass_writes_what_one_by_one_pre_fills_write(kind: str) -> None:
    model = _model()
    one, many = DecodeRunner(model, _cache(kind), OPTS), DecodeRunner(model, _cache(kind), OPTS)
    for r in (one, many):
        _prefixes(r, model)
    gen = torch.Generator().manual_seed(4)
    embeds = [model.embed(torch.randint(0, 101, (n,), generator=gen)) for _, _, n in PIECES]
    expected = torch.stack(
        [one.prefill(e, slot, start) for e, (slot, start, _) in zip(embeds, PIECES, strict=True)]
    )
    got = many.prefill_batch(
        torch.cat(embeds), *(list(col) for col in zip(*PIECES, strict=True)), [-1] * len(PIECES)
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for slot, start, n in PIECES:
        assert many.cache.lengths[slot] == start + n
    # the same keys and values at every written position: decoding on from here agrees
    for r in (one, many):
        for slot, start, n in PIECES:
            r.add_lane(slot, start + n, LaneSampling(), token=7)
    assert [many.step() for _ in range(5)] == [one.step() for _ in range(5)]


@pytest.mark.parametrize("kind", ["fixed", "paged"])
@torch.no_grad()
def test_pieces_riding_in_a_step_write_what_their_own_passes_write(kind: str) -> None:
    """Pre-fill pieces in the step's spare rows (``DecodeRunner.step_riding``): the lanes get
    the tokens of a plain step, each piece's last logits are those of its own pre-fill, and
    its keys and values are the same (decoding on from the pieces agrees)."""
    model = _model()
    opts = dataclasses.replace(OPTS, riders=True)

    def runner() -> DecodeRunner:
        if kind == "paged":
            cache = PagedKVCache(CFG, 32, 64, "cpu", torch.float32, page_size=8, num_pages=160)
        else:
            cache = KVCache(CFG, 32, 64, "cpu", torch.float32)
        r = DecodeRunner(model, cache, opts)
        _prefixes(r, model)
        assert cache.allocate(2) == [4, 5]
        for slot, n in [(4, 9), (5, 17)]:
            prompt = model.embed(torch.arange(n) % 101)
            r.add_lane(slot, n, LaneSampling(), logits=r.prefill(prompt, slot, 0))
        return r

    apart, riding = runner(), runner()
    gen = torch.Generator().manual_seed(4)
    embeds = [model.embed(torch.randint(0, 101, (n,), generator=gen)) for _, _, n in PIECES]
    expected = torch.stack(
        [apart.prefill(e, slot, start) for e, (slot, start, _) in zip(embeds, PIECES, strict=True)]
    )
    tokens = apart.step()
    riders = [Rider(e, slot, start) for e, (slot, start, _) in zip(embeds, PIECES, strict=True)]
    assert riding.room >= sum(n for _, _, n in PIECES)
    got_tokens, got = riding.step_riding(riders)
    assert got_tokens == tokens
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for slot, start, n in PIECES:
        assert riding.cache.lengths[slot] == start + n
    # a smaller step after it: the rows and indices of the last one are not read again
    more = model.embed(torch.tensor([3]))  # 2 lanes and 1 row: a batch of 4
    expected_more = apart.prefill(more, 6, 0)
    assert riding.cache.allocate(1) == apart.cache.allocate(1) == [6]
    tokens = apart.step()
    got_tokens, got_more = riding.step_riding([Rider(more, 6, 0)])
    assert got_tokens == tokens
    torch.testing.assert_close(got_more[0], expected_more, rtol=1e-4, atol=1e-4)
    for r in (apart, riding):
        for slot, start, n in PIECES:
            r.add_lane(slot, start + n, LaneSampling(), token=7)
    assert [riding.step() for _ in range(5)] == [apart.step() for _ in range(5)]


@torch.no_grad()
def test_a_piece_inserted_into_a_lane_resumes_it_as_inject_does() -> None:
    model = _model()
    a, b = DecodeRunner(model, _cache("paged"), OPTS), DecodeRunner(model, _cache("paged"), OPTS)
    for r in (a, b):
        _prefixes(r, model)
        for slot, start, n in PIECES[:2]:
            r.add_lane(slot, start + n, LaneSampling(), token=5)
        r.step()
    block = model.embed(torch.tensor([9, 8, 7]))
    other = model.embed(torch.tensor([1, 2, 3, 4]))
    a.inject(1, block)
    a.prefill(other, 3, 13)
    b.prefill_batch(torch.cat([block, other]), [1, 3], [b.lanes[1].position, 13], [3, 4], [1, -1])
    assert [ln.position for ln in b.lanes] == [ln.position for ln in a.lanes]
    assert [b.step() for _ in range(4)] == [a.step() for _ in range(4)]


# ---- the engine: the scheduler's queue ----------------------------------------------------
SAMPLING = SamplingConfig(think_budget=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("batch"), seed=11)


def _answer(session, audio) -> list[int]:  # noqa: ANN001 - a StepAudioSession
    got: list[int] = []
    session.on_token = lambda role, tok, t: got.append(tok)
    list(session.respond(heard(session, audio), CancelToken()))
    return got


def test_callers_listening_share_passes_and_answer_as_they_would_alone(ckpt: Path) -> None:
    engine = cpu_engine(ckpt, max_batch=6)
    audios = [speechlike(1.0 + 0.3 * i, seed=20 + i) for i in range(3)]
    alone = []
    for audio in audios:
        s = engine.new_session("sys", SAMPLING)
        listen_in_pieces(s, audio, piece=0.16)
        alone.append(_answer(s, audio))
        s.close()
    sessions = [engine.new_session("sys", SAMPLING) for _ in audios]
    steps = engine.steps
    passes0, rows0 = steps.passes, steps.prefill_chunks
    awaited0 = engine.counters["prefill_passes_awaited"]
    piece = 2560  # 0.16 s: the three callers' audio arrives interleaved
    for i in range(0, max(a.shape[0] for a in audios), piece):
        for s, audio in zip(sessions, audios, strict=True):
            if i < audio.shape[0]:
                s.listen(audio[i : i + piece])
    assert steps.queued > 0 and steps.passes == passes0  # nothing waited for them yet
    together = [_answer(s, a) for s, a in zip(sessions, audios, strict=True)]
    assert together == alone
    passes, rows = steps.passes - passes0, steps.prefill_chunks - rows0
    # one pass per answer; the first one also carried the other two callers' listening
    # (each caller's queued chunks merged into one row): 3 rows, then 1 and 1
    assert (passes, rows) == (3, 3 + 1 + 1)
    assert engine.counters["prefill_passes_awaited"] - awaited0 == 3  # on /metrics, by why
    for s in sessions:
        s.close()
    assert engine.cache.pages_used == 0 and steps.queued == 0


def test_a_discarded_turn_leaves_nothing_queued_and_no_pages(ckpt: Path) -> None:
    engine = cpu_engine(ckpt, max_batch=4)
    s = engine.new_session("sys", SAMPLING)
    pages = engine.cache.pages_used  # the system prompt's
    listen_in_pieces(s, speechlike(1.5, seed=3), piece=0.16)
    assert engine.steps.queued > 0
    s.discard()
    assert engine.steps.queued == 0 and engine.cache.pages_used == pages
    # the next turn answers as a fresh session does
    audio = speechlike(1.0, seed=4)
    listen_in_pieces(s, audio, piece=0.16)
    got = _answer(s, audio)
    fresh = engine.new_session("sys", SAMPLING)
    listen_in_pieces(fresh, audio, piece=0.16)
    assert _answer(fresh, audio) == got
    listen_in_pieces(fresh, speechlike(0.8, seed=5), piece=0.16)
    fresh.close()  # closed while its next turn's pieces are queued: none is left behind
    s.close()
    assert engine.steps.queued == 0 and engine.cache.pages_used == 0


def test_a_pass_is_bounded_by_its_padded_size() -> None:
    from realtime.engine.scheduler import padded_size

    # rows and length padded to powers of two (length at least 8); one row is not padded
    assert [padded_size(1, 13), padded_size(3, 13), padded_size(32, 8), padded_size(5, 20)] == [
        13, 64, 256, 256,
    ]  # fmt: skip


class _Replay:
    """Stands in for a CUDA graph on the CPU: replaying runs the recorded function again, so
    that the graphed pass's buffers (flat pieces, positions, slots, last rows) are tested."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        fn()  # recording runs it once, as capture does
        self.fn = fn

    def replay(self) -> None:
        self.fn()


@torch.no_grad()
def test_the_graphed_pass_fills_its_buffers_as_the_eager_pass_computes() -> None:
    model = _model()
    one = DecodeRunner(model, _cache("paged"), OPTS)
    graphed = DecodeRunner(model, _cache("paged"), OPTS)
    graphed.prefiller.graphs = True
    graphed.backend.record = _Replay  # type: ignore[method-assign]
    for r in (one, graphed):
        _prefixes(r, model)
    gen = torch.Generator().manual_seed(6)
    for pieces in (PIECES, PIECES[1:3], PIECES[:3]):  # 4, 2 and 3 rows (padded to 4)
        embeds = [model.embed(torch.randint(0, 101, (n,), generator=gen)) for *_, n in pieces]
        expected = torch.stack(
            [one.prefill(e, s, start) for e, (s, start, _) in zip(embeds, pieces, strict=True)]
        )
        cols = [list(c) for c in zip(*pieces, strict=True)]
        got = graphed.prefill_batch(torch.cat(embeds), *cols, [-1] * len(pieces))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sorted(graphed.prefiller.batch_graphs) == [(2, 8, 64), (4, 8, 64), (4, 16, 64)]
    for r in (one, graphed):
        for slot, start, n in PIECES:
            r.add_lane(slot, start + n, LaneSampling(), token=7)
    assert [graphed.step() for _ in range(5)] == [one.step() for _ in range(5)]


def test_an_answer_closed_while_its_fork_waits_gives_the_fork_back(ckpt: Path) -> None:
    """While another caller's lanes decode, a new answer's speaking fork waits for the next
    pass; closing the answer then (a barge-in, a hang-up) frees the fork's slot and its queued
    piece, and the other caller goes on."""
    engine = cpu_engine(ckpt, max_batch=6, forced_answer="Hi hello the you think " * 8)
    a = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=200))
    ra = a.respond(UserTurn(text="hello"), CancelToken())
    while not engine.runner.lanes:  # A's lane is on the runner
        next(ra)
    b = engine.new_session("sys", SamplingConfig(think_budget=8, max_new_tokens=20))
    free = engine.cache.free_slots
    rb = b.respond(UserTurn(text="hi"), CancelToken())
    steps = engine.steps
    for _ in range(50):  # B's turn pre-fill runs with A's next step, then its fork waits
        next(rb)
        if any(j.slot != b.slot for j in steps._queue):
            break
        next(ra)
    assert engine.cache.free_slots == free - 1  # the fork's slot, its piece queued
    rb.close()
    assert engine.cache.free_slots == free and not any(j.slot != a.slot for j in steps._queue)
    assert [ln.slot for ln in engine.runner.lanes] == [a.slot]  # B never got a lane
    assert any(ev is not None for ev in (next(ra) for _ in range(4)))  # A goes on
    ra.close()
    a.close()
    b.close()
    assert engine.cache.pages_used == 0 and steps.queued == 0


@torch.no_grad()
def test_an_injection_is_never_merged_behind_another_piece_of_its_slot() -> None:
    """A lane goes on from the end of the piece injected into it, by that piece's length: an
    earlier queued piece of the same slot that ends where the injection starts runs in the
    same pass, but in a row of its own."""
    from realtime.engine.scheduler import Scheduler

    model = _model()
    steps = Scheduler(DecodeRunner(model, _cache("paged"), OPTS))
    _prefixes(steps.runner, model)
    slot, start, _ = PIECES[0]
    lane = steps.add(slot, start + 3, LaneSampling(), token=5)
    steps.defer(model.embed(torch.tensor([1, 2, 3])), slot, start)  # ends at the lane's position
    steps.inject(lane, model.embed(torch.tensor([9, 8])))
    steps.flush()
    assert lane.position == start + 3 + 2 and steps.queued == 0


def test_the_speaking_fork_is_made_in_the_pass_that_closes_the_turn(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a think budget the answer forks a speaking lane. The fork's rows are pre-filled in
    the turn's closing pass (a second row: the queued listening, the closing piece, the closed
    reasoning block) instead of being copied after it and given a pass of their own: one pass
    less before the first word, and both lanes decode what they decoded before."""
    sampling = SamplingConfig(think_budget=5, temperature=0.0, max_new_tokens=8)
    audio = speechlike(1.3, seed=31)

    def answer() -> tuple[list[tuple[str, int]], int]:
        engine = cpu_engine(ckpt, max_batch=6)
        s = engine.new_session("sys", sampling)
        listen_in_pieces(s, audio, piece=0.16)  # listening chunks stay queued (deferred)
        got: list[tuple[str, int]] = []
        s.on_token = lambda role, tok, t: got.append((role, tok))
        passes = engine.steps.passes
        respond = s.respond(heard(s, audio), CancelToken())
        while s.stats.wall_first_token is None:  # up to the answer's first step
            next(respond)
        passes = engine.steps.passes - passes
        list(respond)
        s.close()
        assert engine.cache.pages_used == 0  # the fork's slot and pages came back
        return got, passes

    together, passes = answer()
    from realtime.engine.scheduler import Scheduler

    def apart(self, *args, **kwargs):  # the fork copied after the closing pass, as before
        return None
        yield

    monkeypatch.setattr(Scheduler, "prefill_and_fork", apart)
    before, passes_before = answer()
    assert {role for role, _ in together} == {"formulation", "articulation"}
    assert together == before
    assert (passes, passes_before) == (1, 2)


def test_with_prefill_in_step_listening_and_turn_ends_ride_and_answers_stay_the_same(
    ckpt: Path,
) -> None:
    """``engine.prefill_in_step``: while A answers, B's listening chunks, its closing pre-fill
    and its speaking fork ride in A's steps instead of taking passes of their own; both
    callers decode what they decode without it."""
    sampling = SamplingConfig(think_budget=4, temperature=0.0, max_new_tokens=30)
    audio_a, audio_b = speechlike(1.0, seed=41), speechlike(1.4, seed=42)

    def run(in_step: bool) -> tuple[list[int], list[int], int, int]:
        engine = cpu_engine(ckpt, max_batch=32, prefill_in_step=in_step)
        a, b = (engine.new_session("sys", sampling) for _ in range(2))
        got_a: list[int] = []
        got_b: list[int] = []
        a.on_token = lambda role, tok, t: got_a.append(tok)
        b.on_token = lambda role, tok, t: got_b.append(tok)
        listen_in_pieces(a, audio_a, piece=0.16)
        ra = a.respond(heard(a, audio_a), CancelToken())
        while a.stats.wall_first_token is None:
            next(ra)
        passes = engine.steps.passes
        piece = 2560
        for i in range(0, audio_b.shape[0], piece):  # B speaks while A's answer goes on
            b.listen(audio_b[i : i + piece])
            next(ra, None)
        rb = b.respond(heard(b, audio_b), CancelToken())
        live = [ra, rb]
        while live:
            for r in list(live):
                if next(r, StopIteration) is StopIteration:
                    live.remove(r)
        passes = engine.steps.passes - passes
        riders = engine.counters["prefill_riders"]
        a.close()
        b.close()
        assert engine.cache.pages_used == 0 and engine.steps.queued == 0
        return got_a, got_b, passes, riders

    a_plain, b_plain, passes_plain, riders_plain = run(False)
    a_ride, b_ride, passes_ride, riders = run(True)
    assert (a_ride, b_ride) == (a_plain, b_plain)
    assert riders_plain == 0 and riders >= 3  # listening, the turn's end, the fork
    assert passes_ride == 0 and passes_plain >= 1  # B took no pass of its own
