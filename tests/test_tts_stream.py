"""The threaded stream with a fake synthesiser: ordering, accounting, cancel, threads."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tts.base import AudioChunk, TTSStream
from tts.stream import SynthesisError, TextStream

RATE = 16000


class FakeSynth:
    """10 ms of a 300 Hz tone per character; records the thread and the texts it got."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.threads: set[int] = set()
        self.texts: list[str] = []

    def __call__(self, text: str) -> np.ndarray:
        self.threads.add(threading.get_ident())
        self.texts.append(text)
        if self.fail:
            raise RuntimeError("synthesis failed")
        time.sleep(self.delay_s)
        n = len(text) * RATE // 100
        return (0.5 * np.sin(2 * np.pi * 300 * np.arange(n) / RATE)).astype(np.float32)


def make_stream(synth: FakeSynth, **kw: object) -> TextStream:
    return TextStream(synth, RATE, **kw)  # type: ignore[arg-type]


async def collect(stream: TextStream, timeout: float = 5.0) -> list[AudioChunk]:
    async def run() -> list[AudioChunk]:
        return [c async for c in stream.chunks()]

    return await asyncio.wait_for(run(), timeout)


TEXT = "Sure, the capital of France is Paris. It is known for art, food and fashion."


async def test_all_text_is_spoken_in_small_chunks_off_the_loop() -> None:
    synth = FakeSynth()
    stream = make_stream(synth)
    assert isinstance(stream, TTSStream)
    for word in TEXT.split(" "):
        stream.push_text(word + " ")
    stream.finish()
    chunks = await collect(stream)
    assert all(c.pcm.dtype == np.int16 and c.sample_rate == RATE for c in chunks)
    assert all(len(c.pcm) <= RATE // 50 for c in chunks)  # 20 ms at most
    starts = [c for c in chunks if c.text]
    assert "".join(c.text for c in starts).strip() == TEXT
    assert [c.piece_index for c in starts] == sorted({c.piece_index for c in chunks})
    assert starts[0].text == "Sure,"
    assert threading.get_ident() not in synth.threads


async def test_first_chunk_comes_before_finish() -> None:
    stream = make_stream(FakeSynth())
    stream.push_text("Sure,")
    stream.push_text(" the capital")
    it = stream.chunks().__aiter__()
    first = await asyncio.wait_for(it.__anext__(), 2.0)
    assert first.text == "Sure,"
    stream.cancel()


async def test_cancel_mid_stream_stops_at_once() -> None:
    stream = make_stream(FakeSynth())
    stream.push_text(TEXT)
    stream.finish()
    got = 0
    it = stream.chunks().__aiter__()
    for _ in range(10):  # 0.2 s: all of "Sure," (50 ms) and part of the next piece
        got += len((await it.__anext__()).pcm)
    stream.cancel()
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()
    assert got == RATE // 5 and stream.cancelled


async def test_cancel_from_another_thread_wakes_the_consumer() -> None:
    stream = make_stream(FakeSynth())
    stream.push_text("Hello there and")  # no boundary yet: the consumer waits
    threading.Timer(0.1, stream.cancel).start()
    assert await collect(stream, timeout=2.0) == []


async def test_cancel_before_iterating_yields_nothing() -> None:
    stream = make_stream(FakeSynth())
    stream.push_text("Sure, it is.")
    stream.finish()
    stream.cancel()
    assert await collect(stream) == []


async def test_output_is_resampled_to_the_transport_rate() -> None:
    stream = make_stream(FakeSynth(), output_rate=24000)
    stream.push_text("One, two.")
    stream.finish()
    chunks = await collect(stream)
    assert {c.sample_rate for c in chunks} == {24000}
    assert len(chunks[0].pcm) == 480


async def test_a_failing_synthesiser_ends_the_stream_with_its_error() -> None:
    """Not a quiet end: the consumer must tell a failed answer from a finished one."""
    stream = make_stream(FakeSynth(fail=True))
    stream.push_text("Hello, world.")
    stream.finish()
    with pytest.raises(SynthesisError, match="synthesis failed"):
        await collect(stream)
    stream._worker.join(1.0)
    assert not stream._worker.is_alive()


async def test_later_pieces_are_synthesised_while_earlier_ones_play() -> None:
    stream = make_stream(FakeSynth(delay_s=0.05))
    stream.push_text(TEXT)
    stream.finish()
    it = stream.chunks().__aiter__()
    await it.__anext__()
    await asyncio.sleep(0.3)  # the consumer plays the first chunk; the worker goes on
    assert len(stream.stats.piece_ready) >= 3
    stream.cancel()


def test_push_tokens_is_for_token_heads() -> None:
    stream = make_stream(FakeSynth())
    with pytest.raises(NotImplementedError):
        stream.push_tokens([1, 2])
    stream.cancel()


async def test_first_piece_is_synthesised_before_its_end_is_confirmed() -> None:
    synth = FakeSynth()
    stream = make_stream(synth)
    stream.push_text("The capital of France")  # a space would make this the first piece
    for _ in range(100):
        if synth.texts:
            break
        await asyncio.sleep(0.01)
    assert synth.texts == ["The capital of France"]  # guessed before " is" arrived
    stream.push_text(" is Paris.")
    stream.finish()
    chunks = await collect(stream)
    assert chunks[0].text == "The capital of France"
    assert synth.texts == ["The capital of France", "is Paris."]  # the guess was used
    assert stream.stats.speculation_used


async def test_a_wrong_guess_is_not_spoken() -> None:
    synth = FakeSynth()
    stream = make_stream(synth)
    stream.push_text("The capital of Franc")
    for _ in range(100):
        if synth.texts:
            break
        await asyncio.sleep(0.01)
    stream.push_text("e is Paris.")
    stream.finish()
    chunks = await collect(stream)
    assert [c.text for c in chunks if c.text] == ["The capital of France", " is Paris."]
    assert not stream.stats.speculation_used
