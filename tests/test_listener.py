"""The listener's incremental decoding: audio before a committed pause is never decoded again,
and at the endpoint only the tail since the last pause is left (or nothing at all)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from realtime.asr import Heard
from realtime.config import ASRConfig
from realtime.listener import Listener

RATE = 16000


class RecordingASR:
    """Stands in for whisper: 'hears' the seconds of audio it is given, and records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def transcribe(self, audio: np.ndarray, prompt: str = "") -> str:
        seconds = round(len(audio) / RATE, 2)
        self.calls.append((seconds, prompt))
        return f"<{seconds}s>"

    def hear(self, audio: np.ndarray, prompt: str = "") -> Heard:
        return Heard(self.transcribe(audio, prompt))


def chunk(seconds: float) -> np.ndarray:
    return np.ones(int(seconds * RATE), np.float32) * 0.1


async def test_pause_decode_is_the_final_transcript_when_the_user_stops():
    asr = RecordingASR()
    lis = Listener(asr, ASRConfig(partial_interval_ms=10_000), ThreadPoolExecutor(1))
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(2.0))
    lis.on_pause(2.0)
    assert (await lis.candidate()).text == "<2.0s>"
    assert (await lis.final()).text == "<2.0s>"
    assert len(asr.calls) == 1  # the endpoint cost no decoding at all


async def test_after_a_resumed_pause_only_the_tail_is_decoded():
    asr = RecordingASR()
    lis = Listener(asr, ASRConfig(partial_interval_ms=10_000), ThreadPoolExecutor(1))
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(3.0))
    lis.on_pause(3.0)
    await lis.candidate()
    lis.on_resume(3.4)  # the user went on after a phrase boundary: "<3.0s>" is committed
    lis.append(chunk(1.0))
    text = (await lis.final()).text
    last_seconds, last_prompt = asr.calls[-1]
    assert last_seconds < 1.2  # only the audio after the pause (plus the silence margin)
    assert last_prompt == "<3.0s>"  # the committed words prompt the tail's decoding
    assert text.startswith("<3.0s> ") and len(asr.calls) == 2


async def test_a_short_gap_inside_a_phrase_commits_nothing():
    asr = RecordingASR()
    lis = Listener(
        asr, ASRConfig(partial_interval_ms=10_000, commit_pause_ms=300), ThreadPoolExecutor(1)
    )
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(1.0))
    lis.on_pause(1.0)  # e.g. the silent closure before "France"
    await lis.candidate()
    lis.on_resume(1.2)  # 200 ms: the same phrase goes on
    lis.append(chunk(0.5))
    text = (await lis.final()).text
    assert asr.calls[-1] == (1.5, "")  # the phrase is decoded whole, not "of | France"
    assert text == "<1.5s>"


async def test_a_long_tail_is_committed_even_at_a_short_gap():
    asr = RecordingASR()
    cfg = ASRConfig(partial_interval_ms=10_000, commit_pause_ms=300, max_tail_s=2.0)
    lis = Listener(asr, cfg, ThreadPoolExecutor(1))
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(2.5))
    lis.on_pause(2.5)
    await lis.candidate()
    lis.on_resume(2.6)
    lis.append(chunk(0.5))
    assert (await lis.final()).text.startswith("<2.5s> ")
    assert asr.calls[-1][0] < 0.6  # only the new audio


async def test_partials_are_rate_limited():
    asr = RecordingASR()
    lis = Listener(asr, ASRConfig(partial_interval_ms=500), ThreadPoolExecutor(1))
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(0.2))
    assert await lis.maybe_partial() is None  # not due yet
    lis.append(chunk(0.4))
    assert (await lis.maybe_partial()).text == "<0.6s>"
    assert await lis.maybe_partial() is None  # nothing new since


async def test_a_turn_that_starts_during_the_final_decode_is_kept():
    """finish() resets the listener after the final transcript, but only if no new turn began
    while it was being decoded (the user spoke again at once)."""
    gate = threading.Event()

    class SlowASR(RecordingASR):
        def transcribe(self, audio: np.ndarray, prompt: str = "") -> str:
            gate.wait(5)
            return super().transcribe(audio, prompt)

    lis = Listener(SlowASR(), ASRConfig(partial_interval_ms=10_000), ThreadPoolExecutor(1))
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(1.0))
    final = asyncio.ensure_future(lis.finish())
    await asyncio.sleep(0.05)  # the final decode is running
    lis.start(1.5, chunk(0.5))  # the next turn begins
    gate.set()
    assert (await final).text == "<1.0s>"
    assert lis.active  # the new turn survived
    lis.on_pause(2.0)
    assert (await lis.candidate()).text == "<0.5s>"  # and still holds its own audio


async def test_the_final_of_a_turn_is_its_own_pause_decode_when_the_next_turn_starts_first():
    """The user stopped at a pause whose decode is slow; they speak again before it is done:
    the first turn's final transcript is that decode, not a decode of the new turn's audio."""
    gate = threading.Event()

    class SlowASR(RecordingASR):
        def transcribe(self, audio: np.ndarray, prompt: str = "") -> str:
            gate.wait(5)
            return super().transcribe(audio, prompt)

    asr = SlowASR()
    lis = Listener(asr, ASRConfig(partial_interval_ms=10_000), ThreadPoolExecutor(1))
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(1.0))
    lis.on_pause(1.0)
    final = asyncio.ensure_future(lis.finish())
    await asyncio.sleep(0.05)  # waiting on the pause decode
    lis.start(1.5, chunk(0.3))  # the next turn begins
    gate.set()
    assert (await final).text == "<1.0s>"
    assert [s for s, _ in asr.calls] == [1.0]  # the new turn's audio was not decoded for it
    assert lis.active and (await lis.final()).text == "<0.3s>"
