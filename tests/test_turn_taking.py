"""Turn-taking (issue 13, points 2 and 3): the semantic end of turn with the real Smart Turn v3
model on synthesised speech, its configuration and its Realtime API mapping; and backchannels
that do not stop an answer while real interruptions do."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from server_helpers import speech
from test_controller import EchoEngine, FixedASR, ToneHead, drain

from realtime import endpoint
from realtime.barge_in import BackchannelFilter
from realtime.config import BACKCHANNELS, AgentConfig, ConfigError, load_config
from realtime.context import SessionContext, SessionOptions, Tasks
from realtime.controller import Phase
from realtime.engine.worker import EngineWorker
from realtime.frames import (
    Frame,
    InputAudio,
    Interruption,
    OutputAudio,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    Transcript,
    TurnMetrics,
)
from realtime.server import realtime_protocol as rp
from realtime.server.realtime_events import apply_settings
from realtime.session import Session, SharedModels
from realtime.stages import Stage
from realtime.stages.detector import TurnDetector
from realtime.turn_model import SmartTurn, find_model

RATE = 16000
COMPLETE = "My package never arrived."
HESITATION = "I'd like to book a table for, um,"


def spoken(text: str, tail_s: float = 2.5) -> tuple[np.ndarray, float]:
    """espeak-ng speech of ``text`` then ``tail_s`` of silence; and the true end of speech."""
    pcm = speech(text, pad_s=0.0).astype(np.float32) / 32768.0
    loud = np.where(np.abs(pcm) > 0.01)[0]
    pcm = pcm[: loud[-1] + 1]
    lead = np.zeros(int(0.3 * RATE), np.float32)
    return np.concatenate([lead, pcm, np.zeros(int(tail_s * RATE), np.float32)]), (
        lead.size + pcm.size
    ) / RATE


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurn:
    return SmartTurn()


class _Stops(Stage):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process(self, frame: Frame) -> None:
        self.frames.append(frame)


async def endpoint_delay(cfg: AgentConfig, text: str) -> float:
    """Stream seconds from the true end of speech to the end of the turn, through the real
    turn detector stage fed in 20 ms chunks."""
    await endpoint.ready()
    ctx = SessionContext(SessionOptions(vad=cfg.vad), cfg, False, Tasks("t", print))
    det = TurnDetector(ctx)
    sink = _Stops()
    det.next = sink
    pcm, t_end = spoken(text)
    for i in range(0, pcm.size, 320):
        await det.process(InputAudio(pcm[i : i + 320], i / RATE, time.monotonic()))
    stops = [f for f in sink.frames if isinstance(f, SpeechStopped)]
    assert len(stops) == 1 and not stops[0].noise, stops
    return stops[0].t_decided - t_end


def semantic(**changes: object) -> AgentConfig:
    cfg = AgentConfig()
    cfg.vad.end_of_turn = dataclasses.replace(cfg.vad.end_of_turn, mode="semantic", **changes)
    return cfg


# ---- the model ---------------------------------------------------------------------------------
def test_the_model_is_found_in_the_pipecat_wheel_and_its_features_are_whispers(smart_turn):
    from transformers import WhisperFeatureExtractor

    assert find_model().name.startswith("smart-turn-v3") and find_model().stat().st_size > 1e6
    rng = np.random.default_rng(0)
    x = (0.1 * rng.normal(size=5 * RATE)).astype(np.float32)
    ref = WhisperFeatureExtractor(chunk_length=8)(
        np.pad(x, (3 * RATE, 0)),
        sampling_rate=RATE,
        return_tensors="np",
        padding="max_length",
        max_length=8 * RATE,
        truncation=True,
        do_normalize=True,
    ).input_features
    ours = smart_turn.features(x)
    assert ours.shape == ref.shape == (1, 80, 800)
    assert np.abs(ours - ref).max() < 1e-4


def test_the_model_hears_a_finished_sentence_and_a_hesitation(smart_turn):
    done, t_done = spoken(COMPLETE)
    hesitant, t_hes = spoken(HESITATION)
    pause = int(0.2 * RATE)
    assert smart_turn.probability(done[: int(t_done * RATE) + pause]) > 0.9
    assert smart_turn.probability(hesitant[: int(t_hes * RATE) + pause]) < 0.1


# ---- the end of turn ---------------------------------------------------------------------------
async def test_a_complete_sentence_ends_sooner_than_the_silence_timer():
    timer = await endpoint_delay(AgentConfig(), COMPLETE)
    model = await endpoint_delay(semantic(), COMPLETE)
    assert 0.38 <= timer <= 0.6, timer  # 400 ms of silence (and the VAD's hangover)
    assert model <= 0.36 and model < timer - 0.15, (model, timer)  # ended at the 200 ms check


async def test_a_hesitation_waits_longer_up_to_the_maximum():
    timer = await endpoint_delay(AgentConfig(), HESITATION)
    model = await endpoint_delay(semantic(max_wait_ms=1200), HESITATION)
    assert timer <= 0.6, timer
    assert 1.15 <= model <= 1.4, model  # "incomplete": waited max_wait_ms, then ended


async def test_turned_off_the_silence_timer_decides_and_the_model_is_not_asked():
    cfg = semantic()
    cfg.vad.end_of_turn.mode = "silence"
    ctx = SessionContext(SessionOptions(vad=cfg.vad), cfg, False, Tasks("t", print))
    assert TurnDetector(ctx).classifier is None
    assert await endpoint_delay(cfg, HESITATION) == pytest.approx(
        await endpoint_delay(AgentConfig(), HESITATION)
    )


async def test_without_a_verdict_the_silence_timer_decides(monkeypatch):
    async def no_answer(self, pcm):  # model missing, failed or too slow
        return None

    monkeypatch.setattr(endpoint.TurnClassifier, "complete", no_answer)
    delay = await endpoint_delay(semantic(max_wait_ms=3000), HESITATION)
    assert 0.38 <= delay <= 0.6, delay


async def test_the_user_going_on_after_an_incomplete_verdict_keeps_one_turn():
    """A hesitation, 0.8 s of silence, the rest of the sentence: one turn, not two."""
    first, t1 = spoken(HESITATION, tail_s=0.0)
    rest, _ = spoken("two people tonight.", tail_s=2.0)
    pcm = np.concatenate([first, np.zeros(int(0.8 * RATE), np.float32), rest])
    await endpoint.ready()
    cfg = semantic()
    ctx = SessionContext(SessionOptions(vad=cfg.vad), cfg, False, Tasks("t", print))
    det = TurnDetector(ctx)
    sink = _Stops()
    det.next = sink
    for i in range(0, pcm.size, 320):
        await det.process(InputAudio(pcm[i : i + 320], i / RATE, time.monotonic()))
    stops = [f for f in sink.frames if isinstance(f, SpeechStopped)]
    starts = [f for f in sink.frames if isinstance(f, SpeechStarted)]
    assert len(starts) == len(stops) == 1
    assert stops[0].t_end > t1 + 1.0  # the end of the whole sentence


def test_bad_end_of_turn_settings_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vad:\n  end_of_turn:\n    mode: clever\n")
    with pytest.raises(ConfigError, match="vad.end_of_turn.mode"):
        load_config(bad)
    bad.write_text("vad:\n  end_of_turn:\n    wait: 3\n")
    with pytest.raises(ConfigError, match="end_of_turn.wait"):
        load_config(bad)
    cfg = semantic(check_ms=500, max_wait_ms=300)
    ctx = SessionContext(SessionOptions(vad=cfg.vad), cfg, False, Tasks("t", print))
    with pytest.raises(ValueError, match="check_ms <= max_wait_ms"):
        TurnDetector(ctx)


# ---- the Realtime API: semantic_vad ------------------------------------------------------------
def test_semantic_vad_and_its_eagerness_map_to_the_end_of_turn():
    base = AgentConfig().vad
    session = SimpleNamespace(options=SimpleNamespace(), updates=[])
    session.update = lambda **changes: session.updates.append(changes)
    settings = rp.Settings(model="m", instructions="", voice="alloy")
    conn = SimpleNamespace(settings=settings, session=session)

    def update(td: dict) -> rp.Settings:
        new = rp.parse_session_update({"turn_detection": td}, conn.settings, {"alloy"})
        apply_settings(conn, new, base)  # type: ignore[arg-type]
        return new

    new = update({"type": "semantic_vad", "eagerness": "high"})
    eot = session.updates[-1]["vad"].end_of_turn
    assert eot.mode == "semantic" and eot.threshold == 0.5 and eot.max_wait_ms == 800
    assert new.turn_detection.to_json() == {
        "type": "semantic_vad",
        "eagerness": "high",
        "create_response": True,
        "interrupt_response": True,
    }
    update({"type": "semantic_vad", "eagerness": "auto"})
    eot = session.updates[-1]["vad"].end_of_turn
    assert eot.mode == "semantic" and eot.threshold == base.end_of_turn.threshold
    update({"type": "semantic_vad", "eagerness": "low"})
    low = session.updates[-1]["vad"].end_of_turn
    assert low.threshold > eot.threshold and low.max_wait_ms > eot.max_wait_ms
    update({"type": "server_vad", "silence_duration_ms": 700})
    vad = session.updates[-1]["vad"]
    assert vad.end_of_turn.mode == "silence" and vad.silence_duration_ms == 700
    with pytest.raises(rp.ClientError, match="eagerness"):
        update({"type": "semantic_vad", "eagerness": "eager"})


# ---- barge-in: backchannels do not interrupt ---------------------------------------------------
def test_backchannel_words_are_told_from_real_ones():
    f = BackchannelFilter(BACKCHANNELS)
    assert f.real_words("Uh-huh.") == [] and f.real_words("Mm-hmm, okay. Right!") == []
    assert f.real_words("MMMMMMMM") == [] and f.real_words("All right, yeah.") == []
    assert f.real_words("Okay, but what about tomorrow?") == ["but", "what", "about", "tomorrow"]
    assert f.real_words("Wait.") == ["wait"]


def tone_models() -> SharedModels:
    """An engine that answers 4 s of tone, and a Whisper that hears "uh-huh" (close its
    ``worker``)."""
    return SharedModels(
        AgentConfig(),
        FixedASR("uh-huh"),
        ThreadPoolExecutor(1),
        EchoEngine(words=40),  # 4 s of tone
        EngineWorker(),
        ToneHead(),
    )


@pytest.fixture
def models():
    m = tone_models()
    yield m
    m.worker.close()


async def speaking(models: SharedModels) -> Session:
    session = Session(models, pace_output=True)
    await session.start()
    await session.respond("hello")
    for _ in range(100):
        if session.controller.phase is Phase.SPEAKING:
            break
        await asyncio.sleep(0.02)
    assert session.controller.phase is Phase.SPEAKING
    return session


async def push_live(session: Session, pcm: np.ndarray) -> None:
    for i in range(0, pcm.size, 320):
        await session.push_audio(pcm[i : i + 320], RATE)
        await asyncio.sleep(0.02)


async def test_a_spoken_backchannel_does_not_stop_the_answer(models):
    session = await speaking(models)
    uh_huh, _ = spoken("Uh-huh.", tail_s=0.8)
    await push_live(session, uh_huh)
    c = session.controller
    assert Phase.INTERRUPTED not in c.phases and c.phase is Phase.SPEAKING
    await session.wait_idle()
    await asyncio.sleep(0.2)  # the engine thread records the turn
    frames = drain(session)
    assert any(isinstance(f, SpeechStarted) for f in frames)  # it was heard
    assert not any(isinstance(f, Interruption) for f in frames)
    (metrics,) = [f for f in frames if isinstance(f, TurnMetrics)]
    assert not metrics.interrupted and metrics.spoken == metrics.answer
    # not answered, not committed: the engine's history has the one turn
    assert models.engine.commits == [("hello", metrics.answer, False)]
    await session.close()


async def test_a_long_interruption_stops_the_answer_at_once(models):
    models.asr = FixedASR("wait stop what about tomorrow")
    session = await speaking(models)
    c = session.controller
    deciders: list[Frame] = []
    real = c.process

    async def spy(frame: Frame) -> None:
        before = Phase.INTERRUPTED in c.phases
        await real(frame)
        if not before and Phase.INTERRUPTED in c.phases:  # this frame's step stopped it
            deciders.append(frame)

    c.process = spy  # type: ignore[method-assign]
    words, _ = spoken("Wait, stop, what about tomorrow?", tail_s=1.0)
    await push_live(session, words)
    await asyncio.sleep(0.3)
    # stopped by the frame that recognised it, 0 ms later: a transcript with real words (a
    # partial or a pause's), while the user was still speaking (before barge_in.min_speech_ms)
    assert [type(f) for f in deciders] == [Transcript], deciders
    assert not deciders[0].final
    assert c.phases.count(Phase.INTERRUPTED) == 1
    frames = drain(session)
    cut = next(i for i, f in enumerate(frames) if isinstance(f, Interruption))
    first = next(f.response_id for f in frames if isinstance(f, OutputAudio))
    assert not any(
        isinstance(f, OutputAudio) and f.response_id == first for f in frames[cut:]
    )  # no audio of the answer after the interruption
    assert c.history[0].interrupted and c.history[0].spoken != c.history[0].answer
    await session.close()


async def test_the_controller_judges_speech_over_the_answer(models):
    session = await speaking(models)
    c = session.controller
    # a hum: started, stopped, transcribed as a backchannel -> the answer goes on
    await c.process(SpeechStarted(10.0))
    await c.process(SpeechStopped(10.4, 10.8, time.monotonic(), time.monotonic()))
    await c.process(Transcript("Mm-hmm.", final=True))
    assert c.phase is Phase.SPEAKING and not c.held
    # a cough Whisper hears as a sentence: more words than 0.4 s of sound can hold
    await c.process(SpeechStarted(12.0))
    await c.process(SpeechStopped(12.4, 12.8, time.monotonic(), time.monotonic()))
    await c.process(Transcript("I'm gonna be a fan of the", final=True))
    assert c.phase is Phase.SPEAKING
    # a short real word at its end: stops the answer, and is answered as a turn
    await c.process(SpeechStarted(14.0))
    await c.process(SpeechPaused(14.4))
    assert c.phase is Phase.SPEAKING  # still only judged
    await c.process(SpeechStopped(14.4, 14.8, time.monotonic(), time.monotonic()))
    await c.process(Transcript("Stop.", final=True))
    assert Phase.INTERRUPTED in c.phases
    assert c.response is not None and c.response.turn.text == "Stop."  # answered
    await session.close()


async def test_immediate_mode_stops_at_the_first_voice(models):
    models.config.barge_in.mode = "immediate"
    session = await speaking(models)
    await session.controller.process(SpeechStarted(10.0))
    assert session.controller.phases[-2:] == [Phase.INTERRUPTED, Phase.LISTENING]
    await session.close()


async def test_speculative_answers_still_start_at_the_pause_with_the_semantic_end(models):
    """The 120 ms pause starts the answer ahead of the model's 200 ms check; the "complete"
    verdict releases it."""
    await endpoint.ready()
    models.config.vad.end_of_turn.mode = "semantic"
    models.asr = FixedASR("my package never arrived")
    models.engine.words = 0
    session = Session(models, pace_output=False)
    await session.start()
    pcm, _ = spoken(COMPLETE, tail_s=2.0)
    for i in range(0, pcm.size, 320):
        await session.push_audio(pcm[i : i + 320], RATE)
    await session.wait_idle()
    (metrics,) = [f for f in drain(session) if isinstance(f, TurnMetrics)]
    assert metrics.breakdown["speculative"] == 1.0 and not metrics.interrupted
    assert session.detector.classifier is not None
    assert session.detector.classifier.last_probability > 0.9  # the model did decide
    await session.close()
