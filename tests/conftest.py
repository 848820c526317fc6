"""Fixtures shared by the test modules: spoken audio made inside the tests, and one loaded
offline runtime (models load once per test run)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tts_head():
    from realtime.config import TTSConfig
    from tts import load_tts

    head = load_tts(TTSConfig())
    head.warmup()
    return head


@pytest.fixture(scope="session")
def say(tts_head) -> Callable[..., np.ndarray]:
    """``say(text, lead_s=0.3, tail_s=1.0, rate=16000)`` -> float32 mono speech (Piper's voice,
    its noise off: the same audio in every run, so a test's outcome does not depend on a draw)."""
    from realtime.audio import resample, to_float32

    cache: dict[tuple[str, float], np.ndarray] = {}

    def _say(
        text: str, lead_s: float = 0.3, tail_s: float = 1.0, rate: int = 16000, speed: float = 1.05
    ):
        key = (text, speed)
        if key not in cache:
            cache[key] = to_float32(tts_head.synthesize(text, speaking_rate=speed, vary=False))
        pcm = resample(cache[key], tts_head.sample_rate, rate)
        return np.concatenate(
            [
                np.zeros(int(lead_s * rate), np.float32),
                pcm,
                np.zeros(int(tail_s * rate), np.float32),
            ]
        )

    return _say


@pytest.fixture(scope="session")
def runtime() -> Iterator[object]:
    """The offline default stack (embedded.yaml), loaded once per test run and closed at its end.

    Created and closed with ``asyncio.run``: the Runtime holds threads and executors but nothing
    bound to an event loop, so tests on any loop (function- or module-scoped) share it.
    """
    from realtime.config import load_config
    from realtime.runtime import Runtime

    rt = asyncio.run(Runtime.create(load_config("embedded")))
    yield rt
    asyncio.run(rt.close())


@pytest.fixture(scope="module")
def server_runtime(request: pytest.FixtureRequest) -> Iterator[object]:
    """What the server tests serve: the shared ``runtime``, or with ``SERVER_TESTS_FAKE_RUNTIME=1``
    a fresh ``FakeRuntime`` per module (no models). A module must close every session it opened
    on the shared runtime, so that the next module starts from a quiet one."""
    if os.environ.get("SERVER_TESTS_FAKE_RUNTIME"):
        from server_helpers import FakeRuntime

        yield FakeRuntime()
        return
    rt = request.getfixturevalue("runtime")
    yield rt
    left = [(s.id, "closing" if getattr(s, "_closed", False) else "open") for s in rt.sessions]
    assert not left, f"session(s) left on the shared runtime: {left}"
