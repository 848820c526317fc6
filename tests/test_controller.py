"""The turn controller and the stages below it, on stand-in models (no model loads): phases,
response ids, speculation dropped and released, barge-in, and an audio intake that never
waits on the engine thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from realtime.asr import Heard
from realtime.config import AgentConfig, SamplingConfig
from realtime.controller import Phase
from realtime.engine.base import CancelToken, TokenEvent, TurnStats, UserTurn
from realtime.engine.worker import EngineWorker
from realtime.frames import (
    AnswerText,
    EndFrame,
    Frame,
    Interruption,
    OutputAudio,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
    Transcript,
    TurnMetrics,
)
from realtime.session import Session, SharedModels
from tts.base import AudioChunk

RATE = 16000


class EchoSession:
    """Answers ``you said <text>`` and then ``words`` more words, one per step."""

    def __init__(self, engine: EchoEngine) -> None:
        self.engine = engine
        self.stats = TurnStats()

    def listen(self, pcm16k: np.ndarray) -> None:
        pass

    def respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        self.stats = TurnStats(prefill_tokens=len(turn.text.split()))
        words = ["you", "said", *turn.text.split(), *["and"] * self.engine.words]
        for w in words:
            if cancel.cancelled:
                return
            time.sleep(self.engine.step_s)
            self.stats.generated_tokens += 1
            yield TokenEvent("answer", w + " ")

    def commit(self, turn: UserTurn, spoken_answer: str, interrupted: bool) -> None:
        time.sleep(self.engine.commit_s)  # a slow engine thread (a long pre-fill, say)
        self.engine.commits.append((turn.text, spoken_answer, interrupted))

    def discard(self) -> None:
        pass

    def set_instructions(self, system_prompt: str) -> None:
        self.engine.instructions.append(system_prompt)

    def close(self) -> None:
        pass


class EchoEngine:
    name = "echo"
    input_kind = "text"
    interleaved_responses = False

    def __init__(self, words: int = 0, step_s: float = 0.002, commit_s: float = 0.0) -> None:
        self.words, self.step_s, self.commit_s = words, step_s, commit_s
        self.commits: list[tuple[str, str, bool]] = []
        self.instructions: list[str] = []

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> EchoSession:
        return EchoSession(self)

    def warmup(self) -> None:
        pass

    def close(self) -> None:
        pass


class ToneStream:
    """100 ms of tone per word pushed, as soon as it is pushed."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[str | None] = asyncio.Queue()
        self._cancelled = False

    def push_text(self, delta: str) -> None:
        for w in delta.split():
            self.q.put_nowait(w)

    def push_tokens(self, token_ids: list[int]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        self.q.put_nowait(None)

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        while not self._cancelled:
            w = await self.q.get()
            if w is None:
                return
            pcm = (3000 * np.sin(np.arange(RATE // 10) * 0.1)).astype(np.int16)
            yield AudioChunk(pcm, RATE, text=w)

    def cancel(self) -> None:
        self._cancelled = True
        self.q.put_nowait(None)

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class ToneHead:
    name, sample_rate, accepts = "tone", RATE, "text"

    def open_stream(self, voice=None, speaking_rate=None, output_rate=None) -> ToneStream:
        return ToneStream()

    def voices(self) -> list[str]:
        return ["tone"]

    def warmup(self) -> None:
        pass


class FixedASR:
    def __init__(self, text: str) -> None:
        self.text = text

    def transcribe(self, audio: np.ndarray, prompt: str = "") -> str:
        return self.text

    def hear(self, audio: np.ndarray, prompt: str = "") -> Heard:
        return Heard(self.text)


@pytest.fixture
def models():
    worker = EngineWorker()
    m = SharedModels(
        AgentConfig(),
        FixedASR("what time is it"),
        ThreadPoolExecutor(1),
        EchoEngine(),
        worker,
        ToneHead(),
    )
    yield m
    worker.close()


async def started(models: SharedModels, pace_output: bool = False) -> Session:
    session = Session(models, pace_output=pace_output)
    await session.start()
    return session


def drain(session: Session) -> list[Frame]:
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


async def settle(session: Session) -> None:
    await session.wait_idle()
    await asyncio.sleep(0.05)


async def test_a_dropped_speculation_never_reaches_the_transport(models):
    session = await started(models)
    c = session.controller
    await c.process(SpeechStarted(0.0))
    await c.process(Transcript("what time", final=False, candidate=True))
    await asyncio.sleep(0.1)  # the speculative answer is written and synthesised, held back
    assert c.phase is Phase.SPECULATING and drain(session) == [SpeechStarted(0.0)] + [
        Transcript("what time", final=False, candidate=True)
    ]
    await c.process(SpeechPaused(1.0, resumed=True))  # the user goes on: dropped
    assert c.phase is Phase.LISTENING and c.response is None
    await c.process(Transcript("what time is it", final=False, candidate=True))
    await c.process(SpeechStopped(2.0, 2.4, time.monotonic(), time.monotonic()))
    await c.process(Transcript("what time is it", final=True))  # same text: released
    await settle(session)
    frames = drain(session)
    answers = [f for f in frames if isinstance(f, (AnswerText, OutputAudio))]
    assert {f.response_id for f in answers} == {2}  # only the released answer's frames
    text = "".join(f.text for f in answers if isinstance(f, AnswerText))
    assert text.split() == ["you", "said", "what", "time", "is", "it"]
    (metrics,) = [f for f in frames if isinstance(f, TurnMetrics)]
    assert metrics.breakdown["speculative"] == 1.0 and not metrics.interrupted
    assert metrics.usage == {"input_tokens": 4, "output_tokens": 6, "reasoning_tokens": 0}
    assert c.phases == [
        Phase.SPECULATING,
        Phase.LISTENING,
        Phase.SPECULATING,
        Phase.ANSWERING,
        Phase.SPEAKING,
        Phase.LISTENING,
    ]
    assert models.engine.commits == [("what time is it", text.strip(), False)]
    await session.close()


async def test_other_text_at_the_end_replaces_the_speculation(models):
    session = await started(models)
    c = session.controller
    await c.process(SpeechStarted(0.0))
    await c.process(Transcript("what time", final=False, candidate=True))
    await c.process(SpeechStopped(1.0, 1.4, time.monotonic(), time.monotonic()))
    await c.process(Transcript("what time is it", final=True))
    await settle(session)
    answers = [f for f in drain(session) if isinstance(f, AnswerText)]
    assert {f.response_id for f in answers} == {2}
    assert "".join(f.text for f in answers).split()[2:] == ["what", "time", "is", "it"]
    await session.close()


async def test_barge_in_interrupts_and_the_history_keeps_what_was_heard(models):
    models.engine.words = 40  # 4 s of tone
    session = await started(models, pace_output=True)
    c = session.controller
    await c.process(SpeechStarted(0.0))
    await c.process(SpeechStopped(1.0, 1.4, time.monotonic(), time.monotonic()))
    await c.process(Transcript("hello", final=True))
    await asyncio.sleep(0.45)  # about four words heard
    assert c.phase is Phase.SPEAKING
    await c.process(SpeechStarted(3.0))
    assert c.phase is Phase.SPEAKING  # on hold (barge_in.mode): a backchannel stops nothing
    await c.process(SpeechSustained(3.0))  # the speech went on: a real interruption
    assert c.phases[-2:] == [Phase.INTERRUPTED, Phase.LISTENING] and c.response is None
    await asyncio.sleep(0.3)
    frames = drain(session)
    (interruption,) = [f for f in frames if isinstance(f, Interruption)]
    heard = interruption.spoken_text.split()
    assert 2 <= len(heard) <= 7 and heard[:2] == ["you", "said"], heard
    last_audio = max(i for i, f in enumerate(frames) if isinstance(f, OutputAudio))
    assert last_audio < frames.index(interruption)  # no audio after the interruption
    assert models.engine.commits == [("hello", interruption.spoken_text, True)]
    assert c.history[-1].spoken == interruption.spoken_text and c.history[-1].interrupted
    assert not session.speaker._streams and not session.speaker._ends  # nothing left behind
    await session.close()


async def test_the_audio_intake_never_waits_on_the_engine_thread(models, say):
    """The engine thread is busy for 1.5 s recording each turn; the user's next words (a
    barge-in) must still go in at once, and be heard."""
    models.engine.words, models.engine.commit_s = 30, 1.5
    models.config.barge_in.mode = "immediate"  # the barge-in's first voice stops the answer
    session = await started(models, pace_output=True)
    question = say("What time is it?", tail_s=1.2)
    for i in range(0, len(question), 320):
        await session.push_audio(question[i : i + 320], RATE)
    for _ in range(100):  # until the answer is heard
        if session.controller.phase is Phase.SPEAKING:
            break
        await asyncio.sleep(0.02)
    assert session.controller.phase is Phase.SPEAKING
    slowest = 0.0
    barge = say("Stop, please.", lead_s=0.0, tail_s=0.6)
    for i in range(0, len(barge), 320):
        t0 = time.monotonic()
        await session.push_audio(barge[i : i + 320], RATE)
        slowest = max(slowest, time.monotonic() - t0)
        await asyncio.sleep(0.005)
    assert session.controller.phases.count(Phase.INTERRUPTED) == 1
    assert slowest < 0.3, slowest  # the 1.5 s commit never held up the input
    await session.end()
    frames = [f async for f in session.frames()]
    assert isinstance(frames[-1], EndFrame)
    await session.close()  # queued after the engine jobs before it
    assert len(models.engine.commits) == 2  # the interrupted turn and the barge-in's own


async def test_an_engine_failure_is_an_error_of_that_answer(models):
    def broken(turn, cancel):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    session = await started(models)
    session.engine.session.respond = broken  # type: ignore[union-attr]
    await session.respond("hi")
    await settle(session)
    frames = drain(session)
    errors = [f for f in frames if getattr(f, "code", None) == "engine_error"]
    assert errors and errors[0].response_id == 1 and "boom" in errors[0].message
    (metrics,) = [f for f in frames if isinstance(f, TurnMetrics)]
    assert session.controller.last_response is not None
    assert session.controller.last_response.failed and metrics.answer == ""
    await session.close()


def test_no_thread_is_left_behind_by_a_closed_session(models):
    async def main() -> None:
        session = await started(models)
        await session.respond("hi")
        await settle(session)
        await session.close()
        assert len(session.ctx.tasks) == 0

    before = threading.active_count()
    asyncio.run(main())
    assert threading.active_count() <= before + 1  # the ASR executor's thread at most


async def test_a_tts_failure_ends_the_answer_as_failed_with_an_error(models):
    class BrokenStream(ToneStream):
        async def chunks(self) -> AsyncIterator[AudioChunk]:
            raise RuntimeError("voice file unreadable")
            yield  # pragma: no cover

    models.tts.open_stream = lambda *a, **k: BrokenStream()  # type: ignore[method-assign]
    session = await started(models)
    await session.respond("hi")
    await settle(session)
    frames = drain(session)
    errors = [f for f in frames if getattr(f, "code", None) == "tts_error"]
    assert errors and errors[0].response_id == 1 and "voice file" in errors[0].message
    assert not [f for f in frames if isinstance(f, OutputAudio)]
    assert session.controller.last_response is not None
    assert session.controller.last_response.failed  # not a silent "completed"
    await session.close()


async def test_new_instructions_reach_the_engine_without_waiting_on_it(models):
    models.engine.commit_s = 0.0
    session = await started(models)
    session.update(instructions="Answer like a pirate.")
    await models.worker.call(lambda: None)  # the queued job has run
    assert models.engine.instructions == ["Answer like a pirate."]
    assert session.system_prompt == "Answer like a pirate."
    await session.close()
