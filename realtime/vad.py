"""Turn detection: the WebRTC VAD decides frame by frame, this endpointer turns that into
speech start / pause / resume / stop events with the timing rules of the config.

A *pause* is a short silence inside a turn (``speculative_after_ms``): the listener uses it to
decode ahead of the endpoint. A *stop* is a silence of ``silence_duration_ms``: the turn ends.
All times are stream seconds of the 16 kHz input.

WebRTC's VAD keeps calling frames voiced for 100-150 ms after the words stop (its hangover),
which would delay the pause, and with it the speculative answer, by as much. So a pause also
counts frames more than 30 dB below the turn's loudest as silence (``QUIET_DB``), and a resume
needs frames that are both voiced and loud. The stop, which ends the turn for good, waits for
the VAD's own silence.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import webrtcvad

from realtime.audio import PIPELINE_RATE, to_int16
from realtime.config import VADConfig

EventKind = Literal["start", "pause", "resume", "stop", "discard"]


@dataclass(frozen=True, slots=True)
class VadEvent:
    kind: EventKind
    t: float  # start: first voiced sample; pause: end of last voiced frame; resume: now;
    #           stop/discard: the true end of speech (see _TurnState.true_end)
    t_decided: float  # stream time at which the decision was made
    cut: bool = False  # stop: the turn reached max_turn_s and was cut there


QUIET_DB = 30.0  # a frame this far below the turn's loudest is no speech


@dataclass
class _TurnState:
    t_start: float
    t_last_voiced: float  # by the VAD
    t_last_loud: float = 0.0  # voiced and within QUIET_DB of the loudest
    voiced_s: float = 0.0
    paused: bool = False  # a pause was reported (by the VAD's silence or by quiet frames)
    vad_quiet: bool = False  # the VAD itself has heard a pause's worth of silence
    resume_run: int = 0
    peak_rms: float = 0.0
    # (frame end time, rms) of the last frames: enough to look back past the VAD's hangover
    recent: collections.deque[tuple[float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=150)
    )

    def loud(self, rms: float) -> bool:
        return rms >= self.peak_rms * 10 ** (-QUIET_DB / 20)

    def true_end(self) -> float:
        """The end of the last frame within 30 dB of the turn's loudest: WebRTC's VAD keeps
        calling frames voiced for a while after the words stop, which would flatter latency."""
        floor = self.peak_rms * 10 ** (-QUIET_DB / 20)
        for t_end, rms in reversed(self.recent):
            if t_end <= self.t_last_voiced + 1e-9 and rms >= floor:
                return t_end
        return self.t_last_voiced


class Endpointer:
    def __init__(self, cfg: VADConfig, pause_ms: int = 120) -> None:
        if cfg.frame_ms not in (10, 20, 30):
            raise ValueError(f"vad.frame_ms must be 10, 20 or 30, got {cfg.frame_ms}")
        if not 0 <= cfg.aggressiveness <= 3:
            raise ValueError(f"vad.aggressiveness must be 0..3, got {cfg.aggressiveness}")
        self.cfg = cfg
        self.pause_s = pause_ms / 1000
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self._frame = PIPELINE_RATE * cfg.frame_ms // 1000
        self._frame_s = cfg.frame_ms / 1000
        self._pending = np.zeros(0, dtype=np.int16)
        self._t = 0.0  # stream time of the next sample
        self._run_start: float | None = None  # start of the current voiced run (not yet speech)
        self._run_s = 0.0
        self._turn: _TurnState | None = None

    @property
    def in_speech(self) -> bool:
        return self._turn is not None

    @property
    def now(self) -> float:
        return self._t

    def reset(self) -> None:
        self._turn = None
        self._run_start = None
        self._run_s = 0.0

    def process(self, pcm16k: np.ndarray) -> list[VadEvent]:
        """Feed float32 16 kHz mono audio; returns the events it caused, in order."""
        data = np.concatenate([self._pending, to_int16(pcm16k)])
        events: list[VadEvent] = []
        n = len(data) // self._frame
        for i in range(n):
            frame = data[i * self._frame : (i + 1) * self._frame]
            voiced = self._vad.is_speech(frame.tobytes(), PIPELINE_RATE)
            self._t += self._frame_s
            rms = float(np.sqrt(np.mean(frame.astype(np.float32) ** 2))) / 32768.0
            if self._turn is not None:
                self._turn.peak_rms = max(self._turn.peak_rms, rms)
            events.extend(self._step(voiced, rms))
            if self._turn is not None:
                self._turn.recent.append((self._t, rms))
                self._turn.peak_rms = max(self._turn.peak_rms, rms)
        self._pending = data[n * self._frame :]
        return events

    def force_stop(self) -> list[VadEvent]:
        """End the turn now (end of input): a stop, or a discard for a too-short burst."""
        if self._turn is None:
            return []
        return [self._end(self._turn, self._t)]

    def _step(self, voiced: bool, rms: float) -> list[VadEvent]:
        cfg = self.cfg
        t_frame_start = self._t - self._frame_s
        turn = self._turn
        if turn is None:
            if not voiced:
                self._run_start, self._run_s = None, 0.0
                return []
            if self._run_start is None:
                self._run_start = t_frame_start
            self._run_s += self._frame_s
            if self._run_s * 1000 + 1e-6 >= cfg.start_ms:
                self._turn = _TurnState(
                    self._run_start, self._t, t_last_loud=self._t, voiced_s=self._run_s
                )
                self._run_start, self._run_s = None, 0.0
                return [VadEvent("start", self._turn.t_start, self._t)]
            return []

        out: list[VadEvent] = []
        speech = voiced and turn.loud(rms)
        if voiced:
            turn.voiced_s += self._frame_s
            if not turn.vad_quiet:
                turn.t_last_voiced = self._t
        elif self._t - turn.t_last_voiced + 1e-6 >= self.pause_s:
            turn.vad_quiet = True
        if speech:
            if turn.paused:
                turn.resume_run += 1
                if turn.resume_run * self._frame_s >= 0.04 - 1e-6:
                    turn.paused = turn.vad_quiet = False
                    turn.resume_run = 0
                    turn.t_last_voiced = turn.t_last_loud = self._t
                    out.append(VadEvent("resume", self._t, self._t))
            else:
                turn.t_last_loud = self._t
        else:
            turn.resume_run = 0
            quiet = self._t - min(turn.t_last_voiced, turn.t_last_loud)
            if not turn.paused and quiet + 1e-6 >= self.pause_s:
                turn.paused = True
                out.append(VadEvent("pause", turn.t_last_loud, self._t))
        if not voiced:
            silence = self._t - turn.t_last_voiced
            if silence * 1000 + 1e-6 >= cfg.silence_duration_ms:
                out.append(self._end(turn, self._t))
                return out
        if self._t - turn.t_start >= cfg.max_turn_s:
            out.append(self._end(turn, self._t, cut=True))
        return out

    def _end(self, turn: _TurnState, t_now: float, cut: bool = False) -> VadEvent:
        self._turn = None
        kind: EventKind = "stop" if turn.voiced_s * 1000 >= self.cfg.min_speech_ms else "discard"
        return VadEvent(kind, turn.true_end(), t_now, cut=cut and kind == "stop")
