"""Device time by kind of engine work (realtime/engine/work_timer.py), as ``/metrics`` shows it:
each decode step, pre-fill pass and audio-encoder call of a conversation is counted, and the
totals only grow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from step_audio_fixtures import cpu_engine, listen_in_pieces, speechlike, write_tiny_checkpoint

from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken, UserTurn
from realtime.engine.work_timer import KINDS, WorkTimer


def test_the_timer_adds_up_each_kind_and_refuses_unknown_ones() -> None:
    timer = WorkTimer(torch.device("cpu"))
    with timer.track("decode_step"):
        torch.ones(256, 256) @ torch.ones(256, 256)
    with timer.track("decode_step"):
        pass
    assert timer.runs == {"decode_step": 2, "prefill_pass": 0, "audio_encoder": 0}
    assert timer.ms["decode_step"] > 0
    with pytest.raises(ValueError, match="unknown kind"):
        with timer.track("sleeping"):
            pass
    assert set(timer.stats()) == {f"gpu_ms_{k}" for k in KINDS} | {f"{k}_runs" for k in KINDS}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("timer"), seed=13)


def test_a_conversation_counts_every_step_pass_and_encoder_call(ckpt: Path) -> None:
    engine = cpu_engine(ckpt, max_batch=4)
    before = engine.capacity_stats()
    s = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=5))
    listen_in_pieces(s, speechlike(1.5, seed=1), piece=0.16)
    list(s.respond(UserTurn(), CancelToken()))
    after = engine.capacity_stats()
    s.close()
    steps = engine.steps
    assert after["decode_step_runs"] - before["decode_step_runs"] == steps.steps
    assert after["prefill_pass_runs"] == steps.passes  # the session's history was one too
    # a growing-window pass every 640 ms of the 1.5 s heard, then the tail at the turn's end
    assert after["audio_encoder_runs"] - before["audio_encoder_runs"] == 1.5 // 0.64 + 1
    for kind in KINDS:
        assert after[f"gpu_ms_{kind}"] >= before[f"gpu_ms_{kind}"]
