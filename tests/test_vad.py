import numpy as np
import pytest

from realtime.config import VADConfig
from realtime.vad import Endpointer


def feed(ep: Endpointer, audio: np.ndarray, chunk: int = 320):
    events = []
    for i in range(0, len(audio), chunk):
        events += ep.process(audio[i : i + chunk])
    return events


@pytest.fixture(scope="module")
def question(say):
    return say("What is the capital of France?", lead_s=0.5, tail_s=1.5)


def speech_bounds(audio: np.ndarray, rate: int = 16000) -> tuple[float, float]:
    """Where the synthetic speech really is: first and last 10 ms frame with energy."""
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    loud = np.where(np.sqrt((frames**2).mean(axis=1)) > 0.01)[0]
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01


def test_start_and_stop_near_the_truth(question):
    ep = Endpointer(VADConfig(silence_duration_ms=400))
    events = feed(ep, question)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop", kinds
    true_start, true_end = speech_bounds(question)
    start, stop = events[0], events[-1]
    assert abs(start.t - true_start) < 0.1
    assert abs(stop.t - true_end) < 0.04  # the true end, not the VAD's hangover
    assert 0.4 - 0.03 <= stop.t_decided - stop.t < 0.4 + 0.3


@pytest.mark.parametrize("silence_ms", [200, 600])
def test_silence_duration_is_configurable(question, silence_ms):
    stop = [
        e
        for e in feed(Endpointer(VADConfig(silence_duration_ms=silence_ms)), question)
        if e.kind == "stop"
    ]
    assert len(stop) == 1
    waited = stop[0].t_decided - stop[0].t
    assert silence_ms / 1000 - 0.03 <= waited < silence_ms / 1000 + 0.3


def test_silence_and_short_clicks_are_not_speech():
    ep = Endpointer(VADConfig())
    assert feed(ep, np.zeros(16000 * 3, np.float32)) == []
    rng = np.random.default_rng(0)
    click = np.concatenate([np.zeros(8000), rng.normal(0, 0.3, 1600), np.zeros(16000)]).astype(
        np.float32
    )
    kinds = [e.kind for e in feed(Endpointer(VADConfig(min_speech_ms=300)), click)]
    assert "stop" not in kinds


def test_pause_then_resume_inside_a_turn(say):
    a = say("Tell me", lead_s=0.3, tail_s=0.25)
    b = say("a joke about cats.", lead_s=0.0, tail_s=1.0)
    events = feed(
        Endpointer(VADConfig(silence_duration_ms=500), pause_ms=120), np.concatenate([a, b])
    )
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop"
    assert "pause" in kinds and "resume" in kinds
    assert kinds.count("stop") == 1


def test_chunk_size_does_not_change_decisions(question):
    a = [(e.kind, round(e.t, 2)) for e in feed(Endpointer(VADConfig()), question, chunk=160)]
    b = [(e.kind, round(e.t, 2)) for e in feed(Endpointer(VADConfig()), question, chunk=4000)]
    assert a == b


def test_the_pause_comes_soon_after_the_words_not_after_the_vad_hangover(question):
    """The speculative answer starts at the pause: it must come ``pause_ms`` after the words
    end even where WebRTC's VAD goes on calling the fading tail voiced. A quiet echo of the
    question (40 dB down) after the words is such a tail."""
    true_start, true_end = speech_bounds(question)
    words = question[int(true_start * 16000) : int(true_end * 16000)]
    tail = 0.01 * words[: 16000 // 2]
    k = int(true_end * 16000)
    audio = np.concatenate([question[:k], tail, np.zeros(16000, np.float32)])
    ep = Endpointer(VADConfig(silence_duration_ms=400), pause_ms=120)
    events = feed(ep, audio)
    pauses = [e for e in events if e.kind == "pause" and e.t_decided > true_end - 0.05]
    assert pauses, [e.kind for e in events]
    assert pauses[0].t_decided - true_end < 0.2, pauses[0]
    assert not [e for e in events if e.kind == "resume" and e.t > true_end]  # the tail is no speech
    stop = events[-1]
    assert stop.kind == "stop" and abs(stop.t - true_end) < 0.04
