"""Per-session streaming recognition: the user's words are decoded while they speak, so that
at the end of speech at most the tail since the last pause is left to decode.

The turn's audio is split at pauses (short silences the endpointer reports). When a pause
begins, the audio since the last committed pause is decoded right away; if the user stops, that
decode *is* the final transcript and nothing is left to do at the endpoint. If the user goes on
after a phrase boundary (a pause of ``commit_pause_ms`` or more, or any pause once the tail is
longer than ``max_tail_s``), that text is committed and the audio before the pause is never
decoded again; after a shorter gap the tail keeps growing, so words inside one phrase are always
decoded together.
Between pauses, partial transcripts are decoded every ``partial_interval_ms``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

import numpy as np

from realtime.asr import Heard, WhisperRecognizer
from realtime.audio import PIPELINE_RATE
from realtime.config import ASRConfig


@dataclass
class _Tail:
    """Audio after the last committed pause."""

    t0: float  # stream time of pcm[0]
    chunks: list[np.ndarray] = field(default_factory=list)
    n: int = 0

    def audio(self) -> np.ndarray:
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros(0, np.float32)

    def cut(self, t: float) -> None:
        """Drop audio before stream time ``t``."""
        pcm = self.audio()
        k = max(0, min(len(pcm), int(round((t - self.t0) * PIPELINE_RATE))))
        self.chunks, self.n, self.t0 = [pcm[k:]], len(pcm) - k, self.t0 + k / PIPELINE_RATE


@dataclass(frozen=True, slots=True)
class DecodeHint:
    """How to decode the turn now, from whoever knows the conversation (the turn controller):
    text to put before Whisper's prompt, and how often to decode partial transcripts (None:
    ``asr.partial_interval_ms``)."""

    prompt: str = ""
    partial_interval_ms: int | None = None


@dataclass
class _PauseDecode:
    t: float  # end of speech before the pause
    n: int  # tail samples covered
    task: asyncio.Future[Heard]


class Listener:
    def __init__(self, asr: WhisperRecognizer | None, cfg: ASRConfig, executor: Executor) -> None:
        self.asr = asr
        self.cfg = cfg
        self.executor = executor
        self._committed: list[str] = []
        self._tail: _Tail | None = None
        self._pause: _PauseDecode | None = None
        self._partial_task: asyncio.Future[Heard] | None = None
        self._since_partial = 0
        self._generation = 0  # counts turns started: a late result never touches a newer turn
        # asked when a decode is due (the turn controller's: while the user speaks over an
        # answer, backchannels in the prompt and quicker partials)
        self.hint: Callable[[], DecodeHint] = DecodeHint

    @property
    def active(self) -> bool:
        return self._tail is not None

    def start(self, t0: float, prefix: np.ndarray) -> None:
        self.reset()
        self._generation += 1
        self._tail = _Tail(t0=t0)
        if prefix.size:
            self.append(prefix)

    def append(self, pcm: np.ndarray) -> None:
        if self._tail is None:
            return
        self._tail.chunks.append(pcm)
        self._tail.n += len(pcm)
        self._since_partial += len(pcm)

    def reset(self) -> None:
        self._committed, self._tail, self._pause = [], None, None
        self._since_partial = 0

    def _decode(self, audio: np.ndarray) -> asyncio.Future[Heard]:
        loop = asyncio.get_running_loop()
        prompt = " ".join(p for p in [self.hint().prompt, *self._committed] if p)
        if self.asr is None:
            fut: asyncio.Future[Heard] = loop.create_future()
            fut.set_result(Heard(""))
            return fut
        asr = self.asr
        t_end = None if self._tail is None else self._tail.t0 + len(audio) / PIPELINE_RATE
        return loop.run_in_executor(
            self.executor, lambda: replace(asr.hear(audio, prompt), t_end=t_end)
        )

    def _join(self, tail: Heard, committed: list[str] | None = None) -> Heard:
        """The turn's text so far: the committed phrases, then the tail (with its scores)."""
        phrases = self._committed if committed is None else committed
        text = " ".join(p for p in [*phrases, tail.text.strip()] if p)
        return replace(tail, text=text)

    async def maybe_partial(self) -> Heard | None:
        """A partial transcript if one is due and no decode is running, else None."""
        interval_ms = self.hint().partial_interval_ms or self.cfg.partial_interval_ms
        if (
            self._tail is None
            or self._pause is not None
            or self._since_partial < interval_ms * PIPELINE_RATE // 1000
            or (self._partial_task is not None and not self._partial_task.done())
        ):
            return None
        self._since_partial = 0
        self._partial_task = self._decode(self._tail.audio())
        return self._join(await self._partial_task)

    def on_pause(self, t_end: float) -> None:
        """A pause began: decode the tail now, ahead of a possible endpoint."""
        if self._tail is None:
            return
        self._pause = _PauseDecode(t_end, self._tail.n, self._decode(self._tail.audio()))

    async def candidate(self) -> Heard | None:
        """The whole turn's text if the user stops at the current pause."""
        pause = self._pause
        if pause is None:
            return None
        heard = await pause.task
        return self._join(heard) if self._pause is pause else None

    def on_resume(self, t: float) -> None:
        """The user went on at stream time ``t``: at a phrase boundary, commit the text decoded
        at the pause and drop its audio."""
        pause, self._pause = self._pause, None
        if pause is None or self._tail is None or not pause.task.done() or pause.task.exception():
            return  # an unfinished decode: its audio stays in the tail and is decoded later
        boundary = t - pause.t >= self.cfg.commit_pause_ms / 1000
        if not boundary and self._tail.n < self.cfg.max_tail_s * PIPELINE_RATE:
            return  # a gap inside a phrase: the tail goes on growing
        text = pause.task.result().text.strip()
        if text:
            self._committed.append(text)
            self._tail.cut(pause.t + 0.05)

    async def final(self) -> Heard:
        """The turn's transcript at the endpoint; re-uses the pause decode when it is current."""
        if self._tail is None:
            return Heard("")
        pause, generation, committed = self._pause, self._generation, list(self._committed)
        if pause is not None:
            heard = await pause.task
            # current; or the next turn began while it was decoded: this one ended at that
            # pause (its tail is gone, and the new tail is the next turn's audio)
            if self._pause is pause or self._generation != generation:
                return self._join(heard, committed)
        return self._join(await self._decode(self._tail.audio()), committed)

    async def finish(self) -> Heard:
        """The final transcript, then the turn is over. A turn that started while it was being
        decoded is left alone."""
        generation = self._generation
        heard = await self.final()
        if self._generation == generation:
            self.reset()
        return heard
