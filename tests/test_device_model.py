"""bench/device_model.py: the H100's engine times imposed on the tiny CPU engine (the load
benchmark's emulated mode) make each piece of device work last at least its modelled time,
leave what it computes unchanged, and come off again."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from step_audio_fixtures import cpu_engine, write_tiny_checkpoint

from bench.device_model import MODELS, install
from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken, UserTurn
from realtime.engine.step_audio.core import StepAudioCore
from realtime.models.decode import DecodeRunner


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    return cpu_engine(write_tiny_checkpoint(tmp_path_factory.mktemp("dm"), seed=3))


def test_device_work_lasts_the_modelled_time_and_the_model_comes_off(engine):
    model = MODELS["h100-bf16"]
    pcm = 0.1 * np.random.default_rng(0).standard_normal(32000).astype(np.float32)
    plain = engine.encode(pcm)
    originals = (DecodeRunner.step_riding, DecodeRunner.prefill_batch, StepAudioCore.encode)
    undo = install("h100-bf16")
    try:
        t0 = time.perf_counter()
        emulated = engine.encode(pcm)
        took = time.perf_counter() - t0
        assert took >= model.encoder(len(pcm)) / 1e3
        assert torch.equal(emulated, plain)  # the same work, only slower
        session = engine.new_session("sys", SamplingConfig(think_budget=0, max_new_tokens=4))
        session.listen(pcm)
        steps, passes, t0 = engine.steps.steps, engine.steps.passes, time.perf_counter()
        for _ in session.respond(UserTurn(), CancelToken()):
            pass
        took = time.perf_counter() - t0
        steps, passes = engine.steps.steps - steps, engine.steps.passes - passes
        assert steps >= 4 and passes >= 1
        assert took >= (steps * model.step(1) + passes * model.prefill(1)) / 1e3
        session.close()
    finally:
        undo()
    assert (DecodeRunner.step_riding, DecodeRunner.prefill_batch, StepAudioCore.encode) == originals
