"""Backchannels over the answer do not stop it; real words do, as soon as a decode has them:
the barge-in policy (realtime/barge_in.py), the controller applying it to partial transcripts,
the listener decoding with the controller's hint, and Whisper's scores it relies on."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from server_helpers import speech
from test_listener import RecordingASR, chunk
from test_turn_taking import speaking, tone_models

from realtime.barge_in import BackchannelFilter, BargeInPolicy
from realtime.config import BACKCHANNELS, ASRConfig, BargeInConfig
from realtime.controller import Phase
from realtime.frames import SpeechPaused, SpeechStarted, SpeechStopped, Transcript
from realtime.listener import DecodeHint, Listener


# ---- the policy --------------------------------------------------------------------------------
def test_words_whisper_was_not_sure_of_stop_nothing():
    p = BargeInPolicy(BargeInConfig())
    assert p.stops("Wait, stop.", avg_logprob=-0.5, speech_s=None)
    # a hum decoded as words, below Whisper's failed-decode threshold
    assert not p.stops("And I'm at camp...", avg_logprob=-1.37, speech_s=0.8)
    assert p.stops("And I'm at camp...", avg_logprob=-0.8, speech_s=0.8)
    assert p.stops("Stop.", avg_logprob=None, speech_s=0.4)  # unscored (a text-only recogniser)
    p.cfg.min_avg_logprob = -1.5  # the threshold is the config's
    assert p.stops("And I'm at camp...", avg_logprob=-1.37, speech_s=0.8)


def test_backchannels_hums_and_implausible_sentences_stop_nothing():
    p = BargeInPolicy(BargeInConfig())
    assert not p.stops("Uh-huh. Okay, right.", avg_logprob=-0.3, speech_s=0.9)
    assert not p.stops("Mm-h-n.", avg_logprob=-0.3, speech_s=1.0)  # a hum's letters
    # a cough heard as a sentence: more words than 0.4 s of sound holds
    assert not p.stops("I'm gonna be a fan of the", avg_logprob=-0.5, speech_s=0.4)
    # while the speech goes on (a partial) its length is not known: not checked
    assert p.stops("Okay, but what about tomorrow", avg_logprob=-0.5, speech_s=None)


def test_words_of_only_hum_letters_are_hums():
    f = BackchannelFilter(BACKCHANNELS)
    assert f.real_words("Mm-h. MMHN, hmm, mm-m-m") == []
    assert f.real_words("No, now.") == ["no", "now"]


# ---- the controller ----------------------------------------------------------------------------
@pytest.fixture
def models():
    m = tone_models()
    yield m
    m.worker.close()


async def test_a_partial_transcript_with_a_real_word_stops_the_answer_at_once(models):
    session = await speaking(models)
    c = session.controller
    await c.process(SpeechStarted(10.0))
    await c.process(Transcript("Mm-hm.", final=False, avg_logprob=-0.3))
    assert c.phase is Phase.SPEAKING and c.held  # a backchannel: still judged
    await c.process(Transcript("And then they come", final=False, avg_logprob=-1.15))
    assert c.phase is Phase.SPEAKING and c.held  # words Whisper was not sure of
    # the user still speaks (no pause, no end, not yet min_speech_ms): a sure real word
    await c.process(Transcript("Wait.", final=False, avg_logprob=-0.4))
    assert Phase.INTERRUPTED in c.phases and not c.held
    await session.close()


async def test_a_partial_with_more_words_than_the_sound_holds_stops_nothing(models):
    """A click of 80 ms (the agent's own voice leaking past the echo canceller) decoded as
    words: its length is known once it pauses, partial or not."""
    session = await speaking(models)
    c = session.controller
    await c.process(SpeechStarted(10.0))
    await c.process(SpeechPaused(10.08))
    await c.process(Transcript("Let's see.", final=False, avg_logprob=-0.5, t_end=10.55))
    assert c.phase is Phase.SPEAKING and c.held
    # while the speech goes on, as far as the decoded audio: 0.5 s holds two words
    await c.process(SpeechPaused(10.3, resumed=True))
    await c.process(Transcript("Wait, stop", final=False, avg_logprob=-0.5, t_end=10.5))
    assert Phase.INTERRUPTED in c.phases
    await session.close()


async def test_a_final_of_unsure_words_is_dropped_and_the_answer_goes_on(models):
    session = await speaking(models)
    c = session.controller
    await c.process(SpeechStarted(10.0))
    await c.process(SpeechStopped(10.8, 11.2, time.monotonic(), time.monotonic()))
    await c.process(Transcript("And I'm at camp...", final=True, avg_logprob=-1.37))
    assert c.phase is Phase.SPEAKING and not c.held
    assert Phase.INTERRUPTED not in c.phases
    await session.close()


async def test_the_listener_is_told_to_hear_backchannels_only_while_the_answer_is_judged(models):
    cfg = models.config.barge_in
    session = await speaking(models)
    c = session.controller
    assert c.asr_hint() == DecodeHint()  # nobody speaks over the answer
    await c.process(SpeechStarted(10.0))
    assert c.asr_hint() == DecodeHint(cfg.asr_prompt, cfg.partial_interval_ms)
    assert session.listener.hint() == c.asr_hint()  # the session's listener asks the controller
    await c.process(Transcript("Wait.", final=False, avg_logprob=-0.4))
    assert c.asr_hint() == DecodeHint()  # an interruption: its words are a turn like any other
    await session.close()


async def test_the_listener_decodes_with_the_hint():
    asr = RecordingASR()
    lis = Listener(asr, ASRConfig(partial_interval_ms=10_000), ThreadPoolExecutor(1))
    lis.hint = lambda: DecodeHint("Mm-hm. Okay.", partial_interval_ms=300)
    lis.start(0.0, np.zeros(0, np.float32))
    lis.append(chunk(0.3))
    heard = await lis.maybe_partial()  # due at 300 ms, not at asr.partial_interval_ms
    assert heard is not None and heard.text == "<0.3s>"
    lis.append(chunk(0.3))
    lis.on_pause(0.6)
    await lis.candidate()
    lis.on_resume(1.0)  # a phrase boundary: "<0.6s>" is committed
    lis.append(chunk(0.5))
    await lis.final()
    assert [p for _, p in asr.calls] == ["Mm-hm. Okay.", "Mm-hm. Okay.", "Mm-hm. Okay. <0.6s>"]


async def test_a_decode_says_where_its_audio_ends():
    lis = Listener(RecordingASR(), ASRConfig(partial_interval_ms=300), ThreadPoolExecutor(1))
    lis.start(5.0, chunk(0.2))
    lis.append(chunk(0.3))
    heard = await lis.maybe_partial()
    assert heard is not None and heard.t_end == pytest.approx(5.5)


# ---- Whisper's scores and the prompt -------------------------------------------------------------
def _burst() -> np.ndarray:
    """A cough-like sound: two bursts of noise, sharp attack, fast decay."""
    rng = np.random.default_rng(1)
    burst = rng.normal(0, 0.3, 4000) * np.exp(-np.arange(4000) / 1100)
    gap, pad = np.zeros(1300), np.zeros(4800)
    return np.concatenate([pad, burst, gap, 0.8 * burst, pad]).astype(np.float32)


def test_whisper_is_sure_of_speech_and_not_of_words_it_makes_up_from_a_cough(runtime):
    asr = runtime.asr
    words = asr.hear(speech("Wait, stop, what about tomorrow?").astype(np.float32) / 32768)
    assert "stop" in words.text.lower() and words.avg_logprob is not None
    assert -1.0 <= words.avg_logprob <= 0.0, words
    cough = asr.hear(_burst())
    assert cough.text and cough.avg_logprob is not None and cough.avg_logprob < -1.0, cough


def test_the_backchannel_prompt_makes_whisper_write_backchannels(runtime):
    asr, prompt = runtime.asr, BargeInConfig().asr_prompt
    backchannels = BackchannelFilter(BACKCHANNELS)
    for sound in (speech("Uh-huh.").astype(np.float32) / 32768, _burst()):
        assert backchannels.real_words(asr.hear(sound).text)  # words without the prompt
        assert backchannels.real_words(asr.hear(sound, prompt).text) == []
    # real words stay words
    stop = asr.hear(speech("Stop.").astype(np.float32) / 32768, prompt)
    assert backchannels.real_words(stop.text) == ["stop"]
