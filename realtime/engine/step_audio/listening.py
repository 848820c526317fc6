"""Listening: the user's audio, as it arrives, into the session's cache slot.

The turn is opened (``<|BOT|>human\\n<audio_start>``) at the first audio, then every
``listen_chunk_ms`` the current 25 s piece is re-encoded as a growing window and the new
embeddings, all but the last ``lookahead`` (:mod:`.encoding`), are queued for pre-fill: they
run with the next batched pass, together with the other callers' pieces
(``realtime/engine/scheduler.py``); :attr:`Listening.pos` counts them at once. A piece that
reaches 25 s is closed exactly (a whole-piece encoding of its rest, then
``<audio_end><audio_start>``). At the end of the turn only the tail is left:
:meth:`Listening.tail_turn` (the embeddings already in the cache are kept) or
:meth:`Listening.exact_turn` (``exact_encoding``: every piece re-encoded whole and re-filled).
Nothing generated is ever written below :attr:`Listening.pos`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from realtime.engine.step_audio.core import StepAudioCore
from realtime.models.step_audio.lengths import CHUNK_SAMPLES


@dataclass
class TurnAudio:
    """The end of an audio turn: its embeddings, and what is left to pre-fill."""

    pieces: list[torch.Tensor]  # the turn's embeddings, one tensor per 25 s piece
    parts: list[torch.Tensor]  # to pre-fill from ``start`` before ``<audio_end><|EOT|>``
    start: int


@dataclass
class Listening:
    """The current user turn as far as it is in the cache (never changed by ``respond``)."""

    engine: StepAudioCore = field(repr=False)
    slot: int
    pos: int  # cache length of the listened prefix
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)
    opened: bool = False
    body_start: int = 0  # position of the first <audio_start> of the turn
    piece_start: int = 0  # sample where the current 25 s piece starts
    encoded_upto: int = 0  # samples the last growing-window pass covered
    committed: int = 0  # embeddings of the current piece in the cache
    # finished pieces' embeddings, and the current piece's committed ones
    done_pieces: list[torch.Tensor] = field(default_factory=list, repr=False)
    current: list[torch.Tensor] = field(default_factory=list, repr=False)

    def open(self) -> None:
        """Queue ``<|BOT|>human\\n<audio_start>`` at :attr:`pos` (for the next pre-fill pass)."""
        e = self.engine
        ids = e.builder.open_turn("human").ids
        self.body_start = self.pos + len(ids)
        e.defer_prefill(e.embed_ids([*ids, e.special.audio_start]), self.slot, self.pos)
        self.pos += len(ids) + 1
        self.opened = True

    def hear(self, pcm: np.ndarray) -> None:
        """Append audio (the turn is open) and run the growing-window passes it completes."""
        self.audio = np.concatenate([self.audio, pcm])
        step = self.engine.chunk_samples
        while self.audio.shape[0] - self.encoded_upto >= step:
            self._advance(self.encoded_upto + step)

    def _advance(self, upto: int) -> None:
        """One growing-window pass over the current piece up to sample ``upto``."""
        e = self.engine
        while upto - self.piece_start >= CHUNK_SAMPLES:  # a full 25 s piece: close it exactly
            end = self.piece_start + CHUNK_SAMPLES
            emb = e.encode(self.audio[self.piece_start : end])
            self._commit(emb[self.committed :])
            self.done_pieces.append(torch.cat(self.current))
            ids = [e.special.audio_end, e.special.audio_start]
            e.defer_prefill(e.embed_ids(ids), self.slot, self.pos)
            self.pos += 2
            self.piece_start, self.committed, self.current = end, 0, []
        self.encoded_upto = upto
        if upto <= self.piece_start:
            return
        emb = e.encode(self.audio[self.piece_start : upto])
        keep = max(emb.shape[0] - e.opts.lookahead, self.committed)
        self._commit(emb[self.committed : keep])

    def _commit(self, emb: torch.Tensor) -> None:
        if emb.shape[0] == 0:
            return
        self.engine.defer_prefill(emb, self.slot, self.pos)
        self.pos += emb.shape[0]
        self.committed += emb.shape[0]
        self.current.append(emb)

    def tail_turn(self, audio: np.ndarray) -> TurnAudio:
        """Keep what listening committed; the rest of the current piece follows it."""
        tail = self.engine.encode(audio[self.piece_start :])[self.committed :]
        pieces = [*self.done_pieces, torch.cat([*self.current, tail])]
        return TurnAudio(pieces, [tail], self.pos)

    def exact_turn(self, audio: np.ndarray) -> TurnAudio:
        """Every 25 s piece encoded whole, re-filled from the turn's first embedding on."""
        e = self.engine
        pieces = [e.encode(audio[s : s + CHUNK_SAMPLES]) for s in
                  range(0, max(audio.shape[0], 1), CHUNK_SAMPLES)]  # fmt: skip
        pieces = [p for p in pieces if p.shape[0]] or [pieces[0]]
        parts: list[torch.Tensor] = []
        for i, p in enumerate(pieces):
            if i:
                parts.append(e.embed_ids([e.special.audio_end, e.special.audio_start]))
            parts.append(p)
        return TurnAudio(pieces, parts, self.body_start + 1)
