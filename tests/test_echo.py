"""Echo cancellation (realtime/echo.py) and ``run_mic`` in a simulated room: the speakers'
sound comes back into the microphone late (80 ms) and through a decaying impulse response.
With echo cancellation the answer plays through, and a user talking over it still
interrupts; without it, the agent interrupts itself (so the room is loud enough to matter)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
from typing import Any

import numpy as np
import pytest
from server_helpers import rms, speech

from realtime.echo import EchoCanceller, echo_return_loss_enhancement
from realtime.transports.mic import run_mic

RATE = 16000
BLOCK = RATE // 50  # 20 ms
DELAY_S = 0.08
ASK = "Tell me about the city of Paris and its history."  # a long answer, with gaps
NOISE_RMS = 30.0  # a quiet room's noise floor (-61 dBFS): a microphone never reads zeros


def room_response(seed: int = 0, gain: float = 0.5) -> np.ndarray:
    """A synthetic room: 150 ms of noise decaying with a 30 ms time constant, scaled so the
    echo comes back about ``gain`` times as loud as what was played."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.15 * RATE)) / RATE
    ir = rng.standard_normal(t.size) * np.exp(-t / 0.03)
    return gain * ir / np.sqrt(np.sum(ir**2))


class Room:
    """Speakers and microphone in one room, driven by one 20 ms clock (a duplex device): each
    tick the output callback fills a block, which reaches the microphone ``DELAY_S`` later
    through ``room_response``, mixed with whatever the user says."""

    def __init__(self, question: np.ndarray, interruption: np.ndarray | None) -> None:
        self.ir = room_response()
        self.tail = np.zeros(self.ir.size - 1)
        self.line = np.zeros(int(DELAY_S * RATE))  # the acoustic delay
        self.user = np.asarray(question, np.float64)
        self.interruption = interruption
        self.answer_heard_at: int | None = None  # tick at which the answer began to play
        self.echo: list[np.ndarray] = []
        self.callbacks: dict[str, Any] = {}
        self.running = False
        self.thread: threading.Thread | None = None
        self.tick = 0
        self.rng = np.random.default_rng(1)

    def start(self, kind: str, callback: Any) -> None:
        self.callbacks[kind] = callback
        if self.thread is None:
            self.running = True
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.running = False
        if self.thread is not None:
            self.thread.join(2)

    def _user_block(self) -> np.ndarray:
        i = self.tick * BLOCK
        out = np.zeros(BLOCK)
        part = self.user[i : i + BLOCK]
        out[: part.size] = part
        if self.interruption is not None and self.answer_heard_at is not None:
            j = (self.tick - self.answer_heard_at - 25) * BLOCK  # 0.5 s into the answer
            if 0 <= j < self.interruption.size:
                part = self.interruption[j : j + BLOCK]
                out[: part.size] += part
        return out

    def _run(self) -> None:
        t0 = time.monotonic()
        while self.running:
            played = np.zeros((BLOCK, 1), np.int16)
            if "output" in self.callbacks:
                self.callbacks["output"](played, BLOCK, None, None)
            x = played[:, 0].astype(np.float64)
            if self.answer_heard_at is None and np.abs(x).max() > 500:
                self.answer_heard_at = self.tick
            self.line = np.concatenate([self.line, x])
            delayed, self.line = self.line[:BLOCK], self.line[BLOCK:]
            echo = np.convolve(np.concatenate([self.tail, delayed]), self.ir, mode="valid")
            self.tail = np.concatenate([self.tail, delayed])[-(self.ir.size - 1) :]
            self.echo.append(echo)
            noise = self.rng.standard_normal(BLOCK) * NOISE_RMS
            mic = np.clip(echo + self._user_block() + noise, -32768, 32767).astype(np.int16)
            if "input" in self.callbacks:
                self.callbacks["input"](mic.reshape(-1, 1), BLOCK, None, None)
            self.tick += 1
            time.sleep(max(0.0, t0 + self.tick * BLOCK / RATE - time.monotonic()))


def room_sounddevice(room: Room) -> types.ModuleType:
    sd = types.ModuleType("sounddevice")

    class PortAudioError(Exception):
        pass

    def query_devices(device: Any = None, kind: str | None = None) -> Any:
        info = {
            "name": "room",
            "index": 0,
            "max_input_channels": 1,
            "max_output_channels": 1,
            "default_samplerate": float(RATE),
        }
        return info if kind else [info]

    class _Stream:
        kind = ""

        def __init__(self, callback: Any, **_: Any) -> None:
            self.callback = callback

        def __enter__(self) -> _Stream:
            room.start(self.kind, self.callback)
            return self

        def __exit__(self, *exc: Any) -> None:
            room.stop()

    class InputStream(_Stream):
        kind = "input"

    class OutputStream(_Stream):
        kind = "output"

    sd.PortAudioError = PortAudioError  # type: ignore[attr-defined]
    sd.query_devices = query_devices  # type: ignore[attr-defined]
    sd.InputStream = InputStream  # type: ignore[attr-defined]
    sd.OutputStream = OutputStream  # type: ignore[attr-defined]
    return sd


def test_cancels_a_room_echo_and_keeps_the_near_voice() -> None:
    """Double talk: the far end (one voice) echoes while the user (another) speaks."""
    far = speech("Paris is the capital of France, a large city on the river Seine.", RATE)
    far = np.concatenate([far, far]).astype(np.float64)
    ir = room_response()
    d = int(DELAY_S * RATE)
    echo = np.concatenate([np.zeros(d), np.convolve(far, ir)[: far.size - d]])
    near = np.zeros_like(far)
    user = speech("Sorry, what about Germany?", RATE, pad_s=0.0).astype(np.float64) * 0.5
    start = far.size - user.size - RATE // 2
    near[start : start + user.size] = user
    aec = EchoCanceller()
    out = np.zeros(far.size, np.int16)
    for i in range(0, far.size - BLOCK + 1, BLOCK):
        aec.played(far[i : i + BLOCK].astype(np.int16), RATE)
        mic = np.clip(echo[i : i + BLOCK] + near[i : i + BLOCK], -32768, 32767).astype(np.int16)
        out[i : i + BLOCK] = aec.process(mic, RATE)
    half = far.size // 2
    echo_only = slice(half, start)  # converged, no near speech
    erle = echo_return_loss_enhancement(echo[echo_only], out[echo_only])
    assert erle > 20, f"echo return loss enhancement {erle:.1f} dB"
    talk = slice(start, start + user.size)
    assert rms(out[talk]) > 0.3 * rms(user), "the user's voice was cancelled with the echo"


async def _converse(
    monkeypatch: pytest.MonkeyPatch, runtime: Any, aec: bool, interrupt: bool
) -> tuple[list[dict[str, Any]], Room]:
    interruption = speech("Stop, stop. Tell me about Germany instead, please.", RATE, 0.0)
    room = Room(speech(ASK, RATE), interruption.astype(np.float64) if interrupt else None)
    monkeypatch.setitem(sys.modules, "sounddevice", room_sounddevice(room))
    events: list[dict[str, Any]] = []
    stop = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] in ("turn", "interrupted"):
            stop.set()

    await asyncio.wait_for(
        run_mic(runtime, on_event=on_event, stop=stop, echo_cancellation=aec), 240
    )
    return events, room


async def test_echo_does_not_interrupt_the_answer(
    monkeypatch: pytest.MonkeyPatch, server_runtime: Any
) -> None:
    events, room = await _converse(monkeypatch, server_runtime, aec=True, interrupt=False)
    turns = [e for e in events if e["event"] == "turn"]
    assert turns and not turns[0]["interrupted"], events
    assert not [e for e in events if e["event"] == "interrupted"]
    assert turns[0]["spoken"] == turns[0]["answer"] and turns[0]["answer"]
    assert rms(np.concatenate(room.echo)) > 300  # the room did echo the answer, loudly


async def test_without_echo_cancellation_the_agent_interrupts_itself(
    monkeypatch: pytest.MonkeyPatch, server_runtime: Any
) -> None:
    events, _ = await _converse(monkeypatch, server_runtime, aec=False, interrupt=False)
    assert [e for e in events if e["event"] == "interrupted"], events


async def test_user_speech_over_the_echo_still_interrupts(
    monkeypatch: pytest.MonkeyPatch, server_runtime: Any
) -> None:
    events, room = await _converse(monkeypatch, server_runtime, aec=True, interrupt=True)
    assert room.answer_heard_at is not None
    assert [e for e in events if e["event"] == "interrupted"], events
