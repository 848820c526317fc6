"""Turn detection: the WebRTC VAD decides frame by frame, this endpointer turns that into
speech start / pause / resume / stop events with the timing rules of the config.

A *pause* is a short silence inside a turn (``speculative_after_ms``): the listener uses it to
decode ahead of the endpoint. A *stop* is a silence of ``silence_duration_ms``: the turn ends.
*Sustained* says once that the turn's speech has gone on ``sustain_ms`` from its start: a
voiced, loud frame that late (what turns a barge-in on hold into an interruption). All times are stream seconds of the 16 kHz input.

With ``vad.end_of_turn.mode: semantic`` a silence of ``check_ms`` raises a *check*: the caller
asks the turn model (realtime/endpoint.py) and hands its answer to ``verdict``: complete ends
the turn at once; incomplete waits up to ``max_wait_ms`` of silence; no answer (no model, too
slow) falls back to ``silence_duration_ms``. Until the answer comes, the turn waits.

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

EventKind = Literal["start", "pause", "resume", "stop", "discard", "check", "sustained"]


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
    wait_ms: float = 0.0  # silence that ends this turn (the timer, or the semantic wait)
    checked_at: float | None = None  # t_last_voiced when the last check was raised
    sustained: bool = False
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
    def __init__(self, cfg: VADConfig, pause_ms: int = 120, sustain_ms: int | None = None) -> None:
        if cfg.frame_ms not in (10, 20, 30):
            raise ValueError(f"vad.frame_ms must be 10, 20 or 30, got {cfg.frame_ms}")
        if not 0 <= cfg.aggressiveness <= 3:
            raise ValueError(f"vad.aggressiveness must be 0..3, got {cfg.aggressiveness}")
        eot = cfg.end_of_turn
        if eot.mode == "semantic" and not 0 < eot.check_ms <= eot.max_wait_ms:
            raise ValueError(
                "vad.end_of_turn needs 0 < check_ms <= max_wait_ms, got "
                f"{eot.check_ms} and {eot.max_wait_ms}"
            )
        if not 0.0 <= eot.threshold <= 1.0:
            raise ValueError(f"vad.end_of_turn.threshold must be in [0, 1], got {eot.threshold}")
        self.cfg = cfg
        self.semantic = eot.mode == "semantic"
        self.pause_s = pause_ms / 1000
        self.sustain_s = None if sustain_ms is None else sustain_ms / 1000
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
                    self._run_start,
                    self._t,
                    t_last_loud=self._t,
                    voiced_s=self._run_s,
                    wait_ms=self._first_wait_ms(),
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
            silence_ms = (self._t - turn.t_last_voiced) * 1000 + 1e-6
            if silence_ms >= turn.wait_ms:
                out.append(self._end(turn, self._t))
                return out
            if (
                self.semantic
                and silence_ms >= cfg.end_of_turn.check_ms
                and turn.checked_at != turn.t_last_voiced
            ):
                turn.checked_at = turn.t_last_voiced
                out.append(VadEvent("check", turn.true_end(), self._t))
        elif (
            self.semantic and turn.checked_at is not None and turn.checked_at != turn.t_last_voiced
        ):
            turn.wait_ms = self._first_wait_ms()  # the user went on: a new pause, a new check
        if (
            self.sustain_s is not None
            and speech
            and not turn.sustained
            and self._t - turn.t_start + 1e-6 >= self.sustain_s
        ):
            turn.sustained = True
            out.append(VadEvent("sustained", turn.t_start, self._t))
        if self._t - turn.t_start >= cfg.max_turn_s:
            out.append(self._end(turn, self._t, cut=True))
        return out

    def _first_wait_ms(self) -> float:
        """Silence that ends a turn before any verdict: the timer, or (semantic) the longest
        wait, so that the verdict decides."""
        eot = self.cfg.end_of_turn
        return float(eot.max_wait_ms if self.semantic else self.cfg.silence_duration_ms)

    def verdict(self, complete: bool | None) -> list[VadEvent]:
        """The turn model's answer to the last check: complete ends the turn now (a stop with
        the true end of speech); incomplete waits up to ``max_wait_ms``; None (no answer)
        falls back to the silence timer. Ignored if the user spoke again since the check."""
        turn = self._turn
        if turn is None or turn.checked_at != turn.t_last_voiced:
            return []
        if complete:
            return [self._end(turn, self._t)]
        eot = self.cfg.end_of_turn
        turn.wait_ms = float(eot.max_wait_ms if complete is False else self.cfg.silence_duration_ms)
        if (self._t - turn.t_last_voiced) * 1000 + 1e-6 >= turn.wait_ms:
            return [self._end(turn, self._t)]
        return []

    def _end(self, turn: _TurnState, t_now: float, cut: bool = False) -> VadEvent:
        self._turn = None
        kind: EventKind = "stop" if turn.voiced_s * 1000 >= self.cfg.min_speech_ms else "discard"
        return VadEvent(kind, turn.true_end(), t_now, cut=cut and kind == "stop")
