"""Shared by the server tests: spoken test audio (espeak-ng), a server on a free port, and
``FakeRuntime``, a stand-in that keeps the ``Runtime``/``Session`` contract (energy VAD, a fixed
transcript, a tone as the answer) for quick work on the protocols without loading models: with
``SERVER_TESTS_FAKE_RUNTIME=1`` the ``server_runtime`` fixture (conftest.py) serves it instead of
the real pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from aiohttp import web

from realtime.config import ServerConfig, VADConfig
from realtime.frames import (
    AnswerText,
    Dtmf,
    EndFrame,
    Frame,
    Interruption,
    OutputAudio,
    SpeechStarted,
    SpeechStopped,
    ThinkingText,
    Transcript,
    TurnMetrics,
)
from realtime.server.app import create_app, make_runner

QUESTION = "What is the capital of France?"


@lru_cache(maxsize=8)
def _espeak(text: str) -> tuple[bytes, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True)
        with wave.open(str(path)) as w:
            return w.readframes(w.getnframes()), w.getframerate()


def speech(text: str = QUESTION, rate: int = 16000, pad_s: float = 0.3) -> np.ndarray:
    """``text`` spoken by espeak-ng, int16 mono at ``rate``, with silence either side."""
    data, src_rate = _espeak(text)
    pcm = np.frombuffer(data, dtype=np.int16)
    out = soxr.resample(pcm, src_rate, rate).astype(np.int16)
    pad = np.zeros(int(pad_s * rate), dtype=np.int16)
    return np.concatenate([pad, out, pad])


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return path


@dataclass
class RunningServer:
    runner: web.AppRunner
    port: int
    app: web.Application

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


async def start_server(runtime: Any, config: ServerConfig | None = None) -> RunningServer:
    app = create_app(runtime, config or ServerConfig())
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningServer(runner=runner, port=port, app=app)


def rms(pcm: np.ndarray) -> float:
    x = np.asarray(pcm, dtype=np.float64)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


# ---- a stand-in pipeline ---------------------------------------------------------------------
@dataclass
class FakeOptions:
    instructions: str | None = None
    voice: str | None = None
    speaking_rate: float | None = None
    vad: VADConfig = field(default_factory=VADConfig)
    turn_detection: bool = True
    create_response: bool = True
    interrupt_response: bool = True
    output_sample_rate: int | None = None
    speak: bool = True
    output_lead_s: float = 0.0


class FakeSession:
    FRAME = 320  # 20 ms at 16 kHz

    def __init__(self, runtime: FakeRuntime, pace_output: bool) -> None:
        self.rt = runtime
        self.pace = pace_output
        self.options = FakeOptions()
        self.queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.samples = 0
        self.speaking = False
        self.voiced_run = 0
        self.silent_run = 0
        self.turn_audio = 0
        self.task: asyncio.Task[None] | None = None
        self.turn = 0
        self.messages: list[tuple[str, str]] = []
        self.truncated: list[int] = []
        self.closed = False
        self._rest = np.zeros(0, dtype=np.float32)

    async def start(self) -> None:
        self.rt.sessions.append(self)

    def update(self, **changes: Any) -> None:
        for k, v in changes.items():
            if not hasattr(self.options, k):
                raise TypeError(f"unknown option {k}")
            setattr(self.options, k, v)

    async def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        if not isinstance(pcm, np.ndarray) or pcm.dtype not in (np.int16, np.float32):
            raise ValueError("audio must be int16 or float32")
        if not 8000 <= sample_rate <= 48000:
            raise ValueError(f"sample rate {sample_rate} out of range")
        x = pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        if x.ndim == 2:
            x = x.mean(axis=1)
        x = soxr.resample(x, sample_rate, 16000) if sample_rate != 16000 else x
        x = np.concatenate([self._rest, x.astype(np.float32)])
        n = len(x) // self.FRAME * self.FRAME
        self._rest = x[n:]
        for i in range(0, n, self.FRAME):
            await self._vad(x[i : i + self.FRAME])

    async def _vad(self, frame: np.ndarray) -> None:
        self.samples += len(frame)
        t = self.samples / 16000
        voiced = float(np.sqrt(np.mean(frame * frame))) > 0.01
        if self.speaking:
            self.turn_audio += len(frame)
        if voiced:
            self.voiced_run += 1
            self.silent_run = 0
            if not self.speaking and self.voiced_run >= 3:
                self.speaking = True
                self.turn_audio = self.voiced_run * self.FRAME
                await self.queue.put(SpeechStarted(t=t - 0.06))
                if (
                    self.task is not None
                    and not self.task.done()
                    and self.options.interrupt_response
                ):
                    await self.cancel()
        else:
            self.voiced_run = 0
            self.silent_run += 1
            silence_frames = self.options.vad.silence_duration_ms // 20
            if self.speaking and self.options.turn_detection and self.silent_run >= silence_frames:
                self.speaking = False
                now = time.monotonic()
                await self.queue.put(SpeechStopped(t - self.silent_run * 0.02, t, now, now))
                if self.options.create_response:
                    await self.respond()

    async def press_key(self, digit: str) -> None:
        if digit not in "0123456789*#ABCD" or len(digit) != 1:
            raise ValueError(f"not a keypad key: {digit!r}")
        await self.queue.put(Dtmf(digit))

    async def commit(self) -> None:
        self.speaking = False
        if self.options.create_response:
            await self.respond()

    async def clear(self) -> None:
        self.speaking = False
        self.turn_audio = 0

    async def transcribe(self, pcm: np.ndarray, sample_rate: int) -> str:
        """A clip sent whole: the fixed transcript if it holds any energy."""
        x = pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        return self.rt.transcript if x.size and float(np.sqrt((x**2).mean())) > 0.01 else ""

    async def respond(self, text: str | None = None) -> None:
        if self.task is not None and not self.task.done():
            raise ValueError("a response is already running")
        self.turn += 1
        self.task = asyncio.ensure_future(self._answer(text))

    async def _answer(self, text: str | None) -> None:
        transcript = text or self.rt.transcript
        if text is None:
            await self.queue.put(Transcript(transcript, final=True))
        t0 = time.monotonic()
        await self.queue.put(ThinkingText(self.turn, "The user asks a question."))
        rate = self.options.output_sample_rate or 24000
        n = rate // 50
        tone = (0.3 * 32767 * np.sin(2 * np.pi * 300 * np.arange(int(rate * 1.2)) / rate)).astype(
            np.int16
        )
        first = None
        words = self.rt.answer.split()
        for i in range(0, len(tone), n):
            if i // n < len(words):
                await self.queue.put(AnswerText(self.turn, words[i // n] + " "))
            first = first or time.monotonic()
            if self.options.speak:
                await self.queue.put(
                    OutputAudio(self.turn, tone[i : i + n], rate, "x" if i == 0 else "")
                )
            await asyncio.sleep(0.02 if self.pace else 0.002)
        await self.queue.put(
            TurnMetrics(self.turn, (first or t0) - t0, {}, False, transcript, self.rt.answer)
        )

    @property
    def busy(self) -> bool:
        """An answer is running (the server's drain lets it finish)."""
        return self.task is not None and not self.task.done()

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            await self.queue.put(Interruption(spoken_text=""))
            await self.queue.put(TurnMetrics(self.turn, None, {}, True))

    def add_message(self, role: str, text: str) -> None:
        self.messages.append((role, text))

    def truncate(self, audio_end_ms: int, response_id: int | None = None) -> str:
        self.truncated.append(audio_end_ms)
        return ""

    def forget(self, response_id: int, user: bool = False, answer: bool = False) -> None:
        pass

    async def end(self) -> None:
        await self.queue.put(EndFrame("input ended"))

    async def close(self) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        await self.queue.put(EndFrame("closed"))

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            frame = await self.queue.get()
            yield frame
            if isinstance(frame, EndFrame):
                return


@dataclass
class FakeRuntime:
    transcript: str = QUESTION
    answer: str = "Paris is the capital of France."
    sessions: list[FakeSession] = field(default_factory=list)

    def new_session(self, options: Any = None, pace_output: bool = True) -> FakeSession:
        return FakeSession(self, pace_output)
