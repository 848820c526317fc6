"""The scheduler (realtime/engine/scheduler.py) on the tiny Step-Audio engine (CPU): while a
newcomer's answer pre-fills a long history chunk by chunk, another caller's answer keeps
getting decode steps between the chunks; with one unbounded chunk it gets none."""

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


def _interleaved(ckpt: Path, chunk: int) -> tuple[int, int, int]:
    """A answers; B (a long new history) starts answering. Advance the two answers one item
    each in turn, as the engine worker does with shared streams, until B's pre-fill is done.
    Returns (A's decode steps meanwhile, B's pre-fill chunks, B's pre-filled positions)."""
    engine = cpu_engine(ckpt, max_context=2048, prefill_chunk=chunk, forced_answer=FORCED)
    a = engine.new_session("sys", SAMPLING)
    a.listen(speechlike(0.5))
    ra = a.respond(UserTurn(), CancelToken())
    while next(ra) is None:  # A's lanes are on the runner and speaking
        pass
    b = engine.new_session("sys", SAMPLING)
    b.set_instructions(LONG_PROMPT)  # re-filled when B's next turn opens, in its answer
    rb = b.respond(UserTurn(text="Hi"), CancelToken())
    steps0, chunks0, a_events = engine.steps.steps, engine.steps.prefill_chunks, 0
    while b.stats.wall_prefill_done is None:
        next(rb)
        if b.stats.wall_prefill_done is None and next(ra) is not None:
            a_events += 1
    steps = engine.steps.steps - steps0
    chunks = engine.steps.prefill_chunks - chunks0
    assert a_events <= steps  # each of A's events came from a step
    ra.close()
    rb.close()
    return steps, chunks, b._hist_len


def test_a_long_prefill_runs_in_chunks_with_the_others_steps_between(ckpt):
    steps, chunks, history = _interleaved(ckpt, chunk=32)
    assert history > 150  # a long history: several chunks of 32
    assert chunks >= history // 32
    assert steps >= chunks - 1  # a step of A between every two chunks of B


def test_one_unbounded_chunk_stalls_the_others(ckpt):
    steps, chunks, _ = _interleaved(ckpt, chunk=100_000)
    assert chunks == 2  # the history, then the turn: nothing between them but one step
    assert steps <= 1
