"""Acoustic echo cancellation: take the agent's own voice, played through the speakers and
picked up again by the microphone, out of the microphone signal, so that it does not barge in
on the answer it belongs to.

WebRTC's audio processing module (AEC3, with its delay estimator and residual-echo
suppressor), through the ``livekit`` package's ``AudioProcessingModule``. Any transport that
plays the answer into the same room it records can use it:

    aec = EchoCanceller()
    aec.played(pcm, rate)          # what went to the speakers, as it goes (any thread)
    clean = aec.process(mic, rate)  # the microphone, before the session hears it

Both streams are handled at 16 kHz in 10 ms frames. The reference needs no exact alignment:
AEC3 finds the delay (the output buffer, the room, the input buffer) itself, as long as each
far-end frame is given before the microphone frames that carry its echo.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from realtime.audio import PIPELINE_RATE, StreamResampler

FRAME = PIPELINE_RATE // 100  # 10 ms: the module's frame


def _module(noise_suppression: bool):  # -> livekit.rtc.AudioProcessingModule
    from livekit import rtc

    return rtc.AudioProcessingModule(
        echo_cancellation=True,
        noise_suppression=noise_suppression,
        high_pass_filter=True,
        auto_gain_control=False,
    )


class EchoCanceller:
    """Echo cancellation for one conversation (the module adapts to one room)."""

    def __init__(self, noise_suppression: bool = False) -> None:
        from livekit import rtc

        self._rtc = rtc
        self._apm = _module(noise_suppression)
        self._lock = threading.Lock()
        self._far: deque[np.ndarray] = deque()  # reference frames not yet given to the module
        self._far_rest = np.zeros(0, np.int16)
        self._far_resample = StreamResampler(PIPELINE_RATE, dtype=np.int16)
        self._near_rest = np.zeros(0, np.int16)
        self._near_resample = StreamResampler(PIPELINE_RATE, dtype=np.int16)
        self.far_frames = 0
        self.near_frames = 0

    def _to_rate(self, pcm: np.ndarray, rate: int, rs: StreamResampler) -> np.ndarray:
        """int16 at 16 kHz (``StreamResampler`` takes any sample type and passes 16 kHz as is)."""
        return np.asarray(rs(pcm, rate), dtype=np.int16).reshape(-1)

    def _frame(self, pcm: np.ndarray) -> object:
        return self._rtc.AudioFrame(pcm.tobytes(), PIPELINE_RATE, 1, FRAME)

    def played(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Audio that has just gone to the speakers (int16 or float32, any rate). Safe to call
        from an audio device's thread: it only queues the frames."""
        pcm = self._to_rate(pcm, sample_rate, self._far_resample)
        with self._lock:
            data = np.concatenate([self._far_rest, pcm])
            n = len(data) // FRAME * FRAME
            self._far.extend(data[i : i + FRAME] for i in range(0, n, FRAME))
            self._far_rest = data[n:]

    def process(self, pcm: np.ndarray, sample_rate: int) -> np.ndarray:
        """The microphone's audio without the echo of what was played: int16 at 16 kHz. What
        does not fill a 10 ms frame waits for the next call (at most 10 ms of delay)."""
        pcm = self._to_rate(pcm, sample_rate, self._near_resample)
        data = np.concatenate([self._near_rest, pcm])
        n = len(data) // FRAME * FRAME
        self._near_rest = data[n:].copy()
        out = np.empty(n, np.int16)
        for i in range(0, n, FRAME):
            with self._lock:
                far = list(self._far)
                self._far.clear()
            for f in far:  # the reference first: it must lead its echo
                self._apm.process_reverse_stream(self._frame(f))
            self.far_frames += len(far)
            frame = self._frame(np.ascontiguousarray(data[i : i + FRAME]))
            self._apm.process_stream(frame)
            out[i : i + FRAME] = np.frombuffer(bytes(frame.data), dtype=np.int16)
            self.near_frames += 1
        return out


def echo_return_loss_enhancement(echo: np.ndarray, residual: np.ndarray) -> float:
    """ERLE in dB: how much weaker the echo is after cancellation than before."""
    e = float(np.sum(np.asarray(echo, np.float64) ** 2))
    r = float(np.sum(np.asarray(residual, np.float64) ** 2))
    return 10.0 * np.log10(max(e, 1e-9) / max(r, 1e-9))
