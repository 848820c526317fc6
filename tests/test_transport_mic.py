"""``run_mic``: a clear NoAudioDeviceError on a machine without a sound card (this one), and
the streaming path against a stand-in ``sounddevice`` that plays a spoken question."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
from typing import Any

import numpy as np
import pytest
from server_helpers import QUESTION, rms, speech

from realtime.transports.mic import NoAudioDeviceError, find_devices, run_mic


def _has_sound_card() -> bool:
    try:
        import sounddevice as sd

        sd.query_devices(kind="input")
        sd.query_devices(kind="output")
        return True
    except Exception:
        return False


@pytest.mark.skipif(_has_sound_card(), reason="this machine has a sound card")
async def test_no_device_is_a_clear_error() -> None:
    with pytest.raises(NoAudioDeviceError) as info:
        find_devices()
    message = str(info.value)
    assert "no input audio device found" in message
    assert "--file" in message
    with pytest.raises(NoAudioDeviceError):
        await run_mic(runtime=object())  # fails before touching the runtime


class _Stream:
    def __init__(self, callback: Any, samplerate: int, blocksize: int, **_: Any) -> None:
        self.callback, self.rate, self.block = callback, samplerate, blocksize
        self.running = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Stream:
        self.running = True
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join(2)


def fake_sounddevice(question: np.ndarray, played: list[np.ndarray]) -> types.ModuleType:
    sd = types.ModuleType("sounddevice")

    class PortAudioError(Exception):
        pass

    def query_devices(device: Any = None, kind: str | None = None) -> Any:
        info = {
            "name": "fake",
            "index": 0,
            "max_input_channels": 1,
            "max_output_channels": 1,
            "default_samplerate": 16000.0,
        }
        return info if kind else [info]

    class InputStream(_Stream):
        def _run(self) -> None:
            audio = np.concatenate([question, np.zeros(self.rate * 30, np.int16)])
            for i in range(0, len(audio) - self.block, self.block):
                if not self.running:
                    return
                self.callback(audio[i : i + self.block].reshape(-1, 1), self.block, None, None)
                time.sleep(self.block / self.rate)

    class OutputStream(_Stream):
        def _run(self) -> None:
            while self.running:
                out = np.zeros((self.block, 1), np.int16)
                self.callback(out, self.block, None, None)
                played.append(out[:, 0].copy())
                time.sleep(self.block / self.rate)

    sd.PortAudioError = PortAudioError  # type: ignore[attr-defined]
    sd.query_devices = query_devices  # type: ignore[attr-defined]
    sd.InputStream = InputStream  # type: ignore[attr-defined]
    sd.OutputStream = OutputStream  # type: ignore[attr-defined]
    return sd


async def test_conversation_through_devices(
    monkeypatch: pytest.MonkeyPatch, server_runtime: Any
) -> None:
    played: list[np.ndarray] = []
    monkeypatch.setitem(
        sys.modules, "sounddevice", fake_sounddevice(speech(QUESTION, 16000), played)
    )
    events: list[dict[str, Any]] = []
    stop = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if event["event"] == "turn":
            stop.set()

    await asyncio.wait_for(run_mic(server_runtime, on_event=on_event, stop=stop), 180)
    finals = [e["text"] for e in events if e["event"] == "transcript" and e["final"]]
    assert finals and "capital" in finals[-1].lower()
    await asyncio.sleep(0)
    audio = np.concatenate(played)
    assert rms(audio) > 50 and np.count_nonzero(np.abs(audio) > 1000) > 16000 * 0.3
