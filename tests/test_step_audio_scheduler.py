"""The scheduler (realtime/engine/scheduler.py) on the tiny Step-Audio engine (CPU): while a
newcomer's answer pre-fills a long history chunk by chunk, another caller's answer keeps
getting decode steps between the passes, each pass bounded by ``prefill_chunk``; with one
unbounded chunk, the whole history goes in one pass before the other caller's next step."""

from __future__ import annotations

from pathlib import Path

import pytest
from step_audio_fixtures import cpu_engine, speechlike, write_tiny_checkpoint

from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken, UserTurn

FORCED = "Hi hello the you think " * 12
LONG_PROMPT = "hello the you " * 60
SAMPLING = SamplingConfig(think_budget=0, max_new_tokens=400)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sched"), seed=5)


def _interleaved(ckpt: Path, chunk: int) -> tuple[int, int, list[int], int]:
    """A answers; B (a long new history) starts answering. Advance the two answers one item
    each in turn, as the engine worker does with shared streams, until B's pre-fill is done.
    Returns (A's decode steps meanwhile, pre-fill passes meanwhile, the positions of each
    pass, B's pre-filled history)."""
    engine = cpu_engine(ckpt, max_context=2048, prefill_chunk=chunk, forced_answer=FORCED)
    a = engine.new_session("sys", SAMPLING)
    a.listen(speechlike(0.5))
    ra = a.respond(UserTurn(), CancelToken())
    while next(ra) is None:  # A's lanes are on the runner and speaking
        pass
    b = engine.new_session("sys", SAMPLING)
    b.set_instructions(LONG_PROMPT)  # re-filled when B's next turn opens, in its answer
    rb = b.respond(UserTurn(text="Hi"), CancelToken())
    sched = engine.steps
    steps0, passes0, a_events = sched.steps, sched.passes, 0
    while b.stats.wall_prefill_done is None:
        next(rb)
        if b.stats.wall_prefill_done is None and next(ra) is not None:
            a_events += 1
    steps, passes = sched.steps - steps0, sched.passes - passes0
    assert a_events <= steps  # each of A's events came from a step
    ra.close()
    rb.close()
    return steps, passes, sched.pass_tokens[-passes:], b._hist_len


def test_a_long_prefill_runs_in_bounded_passes_with_the_others_steps_between(ckpt):
    steps, passes, sizes, history = _interleaved(ckpt, chunk=32)
    assert history > 150  # a long history: several chunks of 32
    assert passes >= history // 32
    assert max(sizes) <= 32  # no pass holds A's next step back by more than one chunk
    assert steps >= passes - 1  # a step of A after every pass


def test_one_unbounded_chunk_stalls_the_others(ckpt):
    steps, passes, sizes, history = _interleaved(ckpt, chunk=100_000)
    assert max(sizes) >= history  # the whole history in one pass, before A's next step
    assert passes <= 3  # the history, the turn (and with it anything else queued)
