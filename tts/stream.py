"""A text-to-speech stream that any piece synthesiser can drive (Piper, espeak-ng).

Text deltas go into a thread-safe inbox. A worker thread (one per stream) segments them,
normalises each piece, synthesises it, trims silence, resamples it and hands the piece's
audio to the event loop through an asyncio queue. While it waits for text, it synthesises the
first piece as it would be if a space came next ("The capital of France" before " is"), and
uses that audio if the guess is confirmed. ``chunks()`` slices each piece into
``chunk_ms`` chunks as it yields them, so that ``cancel()`` stops between two chunks and knows
exactly how much audio left the stream.

Synthesis never runs on the event loop, and the next piece is synthesised while the
consumer plays the previous one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from realtime.audio import resample, to_int16
from tts.base import AudioChunk
from tts.normalize import normalize
from tts.segmenter import CLAUSE_END, SENTENCE_END, Segmenter, SegmenterConfig

log = logging.getLogger(__name__)

# A synthesiser turns one normalised piece into float32 mono audio at its sample rate.
SynthFn = Callable[[str], np.ndarray]

_FINISH = object()
_END = object()
_SILENCE = 0.01  # absolute level below which an edge sample counts as silence
_KEEP_LEAD_S = 0.015
_KEEP_TAIL_S = {"sentence": 0.25, "clause": 0.15, "word": 0.05}
_IDLE_TIMEOUT_S = 600.0  # a stream nobody finishes or cancels ends on its own
_MAX_SPECULATIONS = 3  # first-piece guesses per stream (each costs one synthesis)


@dataclass
class StreamStats:
    """What a stream did, for metrics and the benchmark (wall times: time.monotonic())."""

    pieces: list[str] = field(default_factory=list)
    synth_s: float = 0.0  # worker time spent synthesising (wasted guesses included)
    audio_s: float = 0.0  # seconds of audio delivered (all pieces)
    wall_first_text: float | None = None
    wall_first_piece: float | None = None  # the segmenter released the first piece
    wall_first_audio: float | None = None  # the first piece's audio was ready
    piece_ready: list[float] = field(default_factory=list)  # wall time each piece was ready
    speculation_used: bool = False  # the first piece was synthesised before it was confirmed

    @property
    def real_time_factor(self) -> float:
        return self.synth_s / self.audio_s if self.audio_s else 0.0


class SynthesisError(RuntimeError):
    """The synthesiser failed: the stream's audio ends here, short of its text."""


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _Piece:
    index: int
    text: str  # the original text (what the history records)
    pcm: np.ndarray  # int16 at the stream's output rate (may be empty)


def trim_silence(audio: np.ndarray, rate: int, piece: str) -> np.ndarray:
    """Cut leading silence to 15 ms and trailing silence to a pause that fits the piece end."""
    loud = np.flatnonzero(np.abs(audio) > _SILENCE)
    if loud.size == 0:
        return audio[:0]
    end = piece.rstrip().rstrip("\"')]}’”*_»")
    kind = (
        "sentence" if end[-1:] in SENTENCE_END else "clause" if end[-1:] in CLAUSE_END else "word"
    )
    start = max(0, int(loud[0]) - int(_KEEP_LEAD_S * rate))
    stop = min(audio.size, int(loud[-1]) + 1 + int(_KEEP_TAIL_S[kind] * rate))
    return audio[start:stop]


class TextStream:
    """One answer's audio. Implements ``tts.base.TTSStream`` for text heads."""

    def __init__(
        self,
        synth: SynthFn,
        synth_rate: int,
        *,
        output_rate: int | None = None,
        segmenter: SegmenterConfig | None = None,
        chunk_ms: int = 20,
        normalizer: Callable[[str], str] = normalize,
        name: str = "tts",
    ) -> None:
        if chunk_ms <= 0:
            raise ValueError("chunk_ms must be positive")
        self.synth_rate = synth_rate
        self.sample_rate = output_rate or synth_rate
        self.chunk_samples = max(1, self.sample_rate * chunk_ms // 1000)
        self.stats = StreamStats()
        self._synth = synth
        self._normalize = normalizer
        self._segmenter = Segmenter(segmenter)
        self._inbox: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        self._cancelled = False
        self._finished = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[object] | None = None
        self._pending: list[object] = []  # delivered before chunks() attached to a loop
        self._iterating = False
        self._speculated: tuple[str, np.ndarray] | None = None
        self._speculations = 0
        self._worker = threading.Thread(target=self._run, name=f"{name}-stream", daemon=True)
        self._worker.start()

    # -- input (any thread) -------------------------------------------------------------------

    def push_text(self, delta: str) -> None:
        if self._finished or self._cancelled or not delta:
            return
        if self.stats.wall_first_text is None:
            self.stats.wall_first_text = time.monotonic()
        self._inbox.put(delta)

    def push_tokens(self, token_ids: list[int]) -> None:
        raise NotImplementedError("this head speaks text; speech tokens need a token head")

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._inbox.put(_FINISH)

    # -- output (event loop) ------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        q = self._attach(asyncio.get_running_loop())
        while True:
            item = await q.get()
            if item is _END or self._cancelled:
                return
            if isinstance(item, _Failed):
                raise SynthesisError(str(item.error)) from item.error
            assert isinstance(item, _Piece)
            pcm = item.pcm
            for offset in range(0, pcm.size, self.chunk_samples):
                if self._cancelled:
                    return
                part = pcm[offset : offset + self.chunk_samples]
                yield AudioChunk(
                    pcm=part,
                    sample_rate=self.sample_rate,
                    text=item.text if offset == 0 else "",
                    piece_index=item.index,
                )

    def cancel(self) -> None:
        with self._lock:
            first = not self._cancelled
            self._cancelled = True
            loop, q = self._loop, self._queue
        if first:
            self._inbox.put(_FINISH)  # wake the worker so it ends
            if loop is not None and q is not None:
                _call_in_loop(loop, q.put_nowait, _END)  # wake chunks() so it ends

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _attach(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[object]:
        with self._lock:
            if self._iterating:
                raise RuntimeError("chunks() can be iterated only once per stream")
            self._iterating = True
            self._loop = loop
            self._queue = asyncio.Queue()
            for item in self._pending:
                self._queue.put_nowait(item)
            self._pending.clear()
            if self._cancelled:
                self._queue.put_nowait(_END)
            return self._queue

    def _deliver(self, item: object) -> None:
        with self._lock:
            if self._loop is None or self._queue is None:
                self._pending.append(item)
                return
            loop, q = self._loop, self._queue
        _call_in_loop(loop, q.put_nowait, item)

    # -- worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._work()
        except Exception as exc:  # chunks() raises it: the answer ends as failed, not cut short
            log.exception("TTS stream worker failed")
            self._deliver(_Failed(exc))
        finally:
            self._deliver(_END)

    def _work(self) -> None:
        while not self._cancelled:
            self._speculate()
            try:
                item = self._inbox.get(timeout=_IDLE_TIMEOUT_S)
            except queue.Empty:
                log.warning("TTS stream neither finished nor cancelled for %.0f s", _IDLE_TIMEOUT_S)
                item = _FINISH
            text, done = [], False
            while True:  # take everything queued: pieces do not depend on how text was split
                if item is _FINISH:
                    done = True
                else:
                    text.append(str(item))
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            pieces = self._segmenter.push("".join(text)) if text else []
            if done:
                pieces += self._segmenter.flush()
            for piece in pieces:
                if self._cancelled:
                    return
                self._speak(piece)
            if done:
                return

    def _speculate(self) -> None:
        """While waiting for text, synthesise the first piece before its end is confirmed."""
        if self._segmenter.pieces_out or self._speculations >= _MAX_SPECULATIONS:
            return
        if not self._inbox.empty():
            return
        candidate = self._segmenter.candidate()
        if candidate is None or (self._speculated and self._speculated[0] == candidate):
            return
        self._speculations += 1
        self._speculated = (candidate, self._render(candidate))

    def _render(self, piece: str) -> np.ndarray:
        """Normalise, synthesise, trim and resample one piece: int16 at the output rate."""
        spoken = self._normalize(piece)
        if not any(c.isalnum() for c in spoken):
            return np.zeros(0, np.int16)
        start = time.monotonic()
        audio = self._synth(spoken)
        audio = trim_silence(audio, self.synth_rate, piece)
        audio = resample(audio, self.synth_rate, self.sample_rate)
        self.stats.synth_s += time.monotonic() - start
        return to_int16(audio)

    def _speak(self, piece: str) -> None:
        stats = self.stats
        if stats.wall_first_piece is None:
            stats.wall_first_piece = time.monotonic()
        index = len(stats.pieces)
        stats.pieces.append(piece)
        if self._speculated and self._speculated[0] == piece:
            pcm = self._speculated[1]
            stats.speculation_used = True
        else:
            pcm = self._render(piece)
        self._speculated = None
        stats.audio_s += pcm.size / self.sample_rate
        ready = time.monotonic()
        stats.piece_ready.append(ready)
        if stats.wall_first_audio is None and pcm.size:
            stats.wall_first_audio = ready
        if not self._cancelled:
            self._deliver(_Piece(index=index, text=piece, pcm=pcm))


def _call_in_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[[object], None], arg: object
) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(arg)
        return
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:
        pass  # the loop has closed: nobody is listening any more
