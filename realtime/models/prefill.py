"""Pre-fill for the decode runner: a sequence's embeddings into its KV-cache slot, logits of
the last position.

Pieces of up to ``max(PREFILL_SIZES)`` tokens replay a CUDA graph captured for the next size
up (static device buffers hold the piece, its positions, the slot and the index of the last
real row; padding rows write junk keys beyond the slot's length, which no query can see
before they are overwritten). Longer pieces, and everything without graphs, run eagerly
through the same module path.
"""

from __future__ import annotations

import bisect
import logging

import torch

from realtime.models.backend import DecoderBackend

PREFILL_SIZES = (8, 16, 32, 64, 128, 256)  # pre-fill pieces padded to these sizes replay a graph
BATCH_ROWS = (2, 4, 8, 16, 32)  # batched passes of these many rows (padded) replay a graph


def padded_shape(rows: int, longest: int) -> tuple[int, int]:
    """The ``(rows, length)`` a batched pass of ``rows`` pieces, the longest ``longest`` long,
    is padded to: each a power of two, the length at least 8."""
    t = 8
    while t < longest:
        t *= 2
    return 1 << (rows - 1).bit_length(), t


def batch_shapes() -> list[tuple[int, int]]:
    """``(rows, length)`` of the batched passes that replay a graph: every power-of-two row
    count of :data:`BATCH_ROWS` and length of at least 8 whose product is a pre-fill size."""
    return [(r, t) for r in BATCH_ROWS for t in PREFILL_SIZES if r * t <= PREFILL_SIZES[-1]]


log = logging.getLogger(__name__)


class Prefiller:
    def __init__(
        self, backend: DecoderBackend, buckets: tuple[int, ...], chunk: int, graphs: bool
    ) -> None:
        self.backend = backend
        self.cache = backend.cache
        self.buckets = buckets
        self.chunk = chunk
        self.graphs = graphs and backend.is_cuda
        cfg, dev, dtype = backend.model.cfg, backend.device, backend.dtype
        scratch = self.cache.scratch_slot
        self._emb = torch.zeros(PREFILL_SIZES[-1], cfg.hidden_size, dtype=dtype, device=dev)
        self._pos = torch.zeros(PREFILL_SIZES[-1], dtype=torch.long, device=dev)
        self._slot = torch.full((1,), scratch, dtype=torch.long, device=dev)
        self._last = torch.zeros(1, dtype=torch.long, device=dev)
        self._logits = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.graphs_by_key: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # batched passes: ``rows x length`` positions, flat, then per-row slot and last index
        size, rows = PREFILL_SIZES[-1], BATCH_ROWS[-1]
        self._bemb = torch.zeros(size, cfg.hidden_size, dtype=dtype, device=dev)
        self._bpos = torch.zeros(size, dtype=torch.long, device=dev)
        self._bslots = torch.full((rows,), scratch, dtype=torch.long, device=dev)
        self._blast = torch.zeros(rows, dtype=torch.long, device=dev)
        self._blogits = torch.zeros(rows, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.batch_graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._batch_shapes = set(batch_shapes())
        self.warm = False  # set by the runner's warm-up: a later capture is logged
        self.late_captures = 0

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Write ``embeds [T, H]`` at positions ``start..`` of ``slot``; logits ``[V]`` of the
        last position (float32, on the device)."""
        t = embeds.shape[0]
        # a paged cache takes pages (or raises KVPoolFull)
        self.cache.ensure(slot, start + t, start)
        logits: torch.Tensor | None = None
        i = 0
        while i < t:
            n = min(t - i, self.chunk)
            piece = embeds[i : i + n].to(self.backend.dtype)
            tb = next((b for b in PREFILL_SIZES if b >= n), None)
            if self.graphs and tb is not None and start + i + tb <= self.cache.max_len:
                logits = self._graphed(piece, slot, start + i, tb)
            else:
                logits = self._eager(piece, slot, start + i)
            i += n
        self.cache.lengths[slot] = start + t
        assert logits is not None
        return logits

    @torch.no_grad()
    def prefill_batch(
        self, embeds: torch.Tensor, slots: list[int], starts: list[int], lengths: list[int]
    ) -> torch.Tensor:
        """Several sequences' pieces in one pass over the weights: piece ``i`` is the next
        ``lengths[i]`` rows of ``embeds`` (``[sum(lengths), H]``), written into ``slots[i]``
        from ``starts[i]`` (each slot at most once). Returns the logits ``[B, V]`` of each
        piece's last position (float32).

        The pieces are padded to ``T`` (a power of two, at least 8) and the rows to a power of
        two, so that the per-token pieces run at a pre-fill size that is compiled already
        (``DecoderBackend.hidden(flat=True)``); attention is per row (SDPA, bool mask).
        Padding positions write junk beyond each piece, which no query sees before it is
        overwritten; padding rows write the scratch slot. A shape of :func:`batch_shapes`
        replays a CUDA graph (captured per attention-length bucket); others run eagerly,
        where launching the layers' pieces one by one took longer than the pass itself
        (about 90 ms for 4 to 32 rows of 8 on an H100, against 29 ms for one graphed row)."""
        b = len(slots)
        if len(set(slots)) != b or len(starts) != b or len(lengths) != b:
            raise ValueError("one piece per slot, with a start and a length each")
        if b == 1:
            return self.prefill(embeds, slots[0], starts[0])[None]
        rows, t = padded_shape(b, max(lengths))
        if max(starts) + t > self.cache.max_len:  # padding would pass the end: one by one
            out, i = [], 0
            for slot, start, n in zip(slots, starts, lengths, strict=True):
                out.append(self.prefill(embeds[i : i + n], slot, start))
                i += n
            return torch.stack(out)
        for slot, start, n in zip(slots, starts, lengths, strict=True):
            self.cache.ensure(slot, start + n, start)
        attn_len = self.buckets[bisect.bisect_left(self.buckets, max(starts) + t)]
        shape = (rows, t, attn_len)
        if self.graphs and (rows, t) in self._batch_shapes:
            logits = self._graphed_batch(embeds, slots, starts, lengths, shape)
        else:
            logits = self._eager_batch(embeds, slots, starts, lengths, shape)
        for slot, start, n in zip(slots, starts, lengths, strict=True):
            self.cache.lengths[slot] = start + n
        return logits

    def _eager_batch(
        self,
        embeds: torch.Tensor,
        slots: list[int],
        starts: list[int],
        lengths: list[int],
        shape: tuple[int, int, int],
    ) -> torch.Tensor:
        rows, t, attn_len = shape
        b = len(slots)
        dev, dtype = self.backend.device, self.backend.dtype
        x = torch.zeros(rows, t, embeds.shape[-1], dtype=dtype, device=dev)
        i = 0
        for r, n in enumerate(lengths):
            x[r, :n] = embeds[i : i + n].to(dtype)
            i += n
        starts_t = torch.tensor([*starts, *[0] * (rows - b)], device=dev)
        positions = starts_t[:, None] + torch.arange(t, device=dev)[None]
        slot_t = torch.tensor([*slots, *[self.cache.scratch_slot] * (rows - b)], device=dev)
        compiled = rows * t <= PREFILL_SIZES[-1]  # a size the pre-fill pieces are compiled for
        with self.backend.sdpa_ctx():
            h = self.backend.hidden(x, positions, slot_t, attn_len, compiled=compiled, flat=True)
        last = torch.tensor([n - 1 for n in lengths], device=dev)
        return self.backend.model.logits(h[torch.arange(b, device=dev), last]).float()

    def _graphed_batch(
        self,
        embeds: torch.Tensor,
        slots: list[int],
        starts: list[int],
        lengths: list[int],
        shape: tuple[int, int, int],
    ) -> torch.Tensor:
        rows, t, _ = shape
        b = len(slots)
        i = 0
        for r, n in enumerate(lengths):
            self._bemb[r * t : r * t + n].copy_(embeds[i : i + n])
            i += n
        pos = [s + j for s in (*starts, *[0] * (rows - b)) for j in range(t)]
        host = torch.tensor(
            [*pos, *slots, *[self.cache.scratch_slot] * (rows - b),
             *(r * t + n - 1 for r, n in enumerate(lengths)), *[0] * (rows - b)],
        )  # fmt: skip
        dev = self.backend.device
        host = host.pin_memory() if dev.type == "cuda" else host
        flat = host.to(dev, non_blocking=True)
        self._bpos[: rows * t].copy_(flat[: rows * t])
        self._bslots[:rows].copy_(flat[rows * t : rows * t + rows])
        self._blast[:rows].copy_(flat[rows * t + rows :])
        graph = self.batch_graphs.get(shape) or self.capture_batch(shape)
        graph.replay()
        return self._blogits[:b].clone()

    def _batch_forward(self, rows: int, t: int, attn_len: int) -> None:
        n = rows * t
        x = self._bemb[:n].view(rows, t, -1)
        pos = self._bpos[:n].view(rows, t)
        h = self.backend.hidden(x, pos, self._bslots[:rows], attn_len, compiled=True, flat=True)
        last = h.reshape(n, -1).index_select(0, self._blast[:rows])
        self._blogits[:rows].copy_(self.backend.model.logits(last).float())

    def capture_batch(self, key: tuple[int, int, int]) -> torch.cuda.CUDAGraph:
        rows, t, _ = key
        if self.warm:
            self.late_captures += 1
            log.warning("batched pre-fill graph %s captured after warm-up (a stall)", key)
        saved = [b.clone() for b in (self._bpos, self._bslots, self._blast)]
        self._bslots.fill_(self.cache.scratch_slot)  # capture writes the scratch slot only
        self._bpos.copy_(torch.arange(t, device=self._bpos.device).repeat(len(self._bpos) // t))
        self._blast.zero_()
        graph = self.backend.record(lambda: self._batch_forward(*key))
        for buf, old in zip((self._bpos, self._bslots, self._blast), saved, strict=True):
            buf.copy_(old)
        self.batch_graphs[key] = graph
        return graph

    def _eager(self, piece: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        n = piece.shape[0]
        dev = self.backend.device
        pos = torch.arange(start, start + n, device=dev)[None]
        slots = torch.tensor([slot], device=dev)
        attn_len = min(self.cache.max_len, -(-(start + n) // 64) * 64)
        with self.backend.sdpa_ctx():  # any length: not compiled (no recompile per length)
            x = self.backend.hidden(piece[None], pos, slots, attn_len, compiled=False)
        return self.backend.model.logits(x[0, -1:])[0].float()

    def _graphed(self, piece: torch.Tensor, slot: int, start: int, tb: int) -> torch.Tensor:
        n = piece.shape[0]
        attn_len = self.buckets[bisect.bisect_left(self.buckets, start + tb)]
        self._emb[:n].copy_(piece)
        torch.arange(start, start + tb, device=self.backend.device, out=self._pos[:tb])
        self._slot.fill_(slot)
        self._last.fill_(n - 1)
        key = (tb, attn_len)
        graph = self.graphs_by_key.get(key)
        if graph is None:
            graph = self.capture(key)
        graph.replay()
        return self._logits[0].clone()

    def _forward(self, tb: int, attn_len: int) -> None:
        x = self.backend.hidden(self._emb[:tb][None], self._pos[:tb][None], self._slot, attn_len)
        last = x[0].index_select(0, self._last)
        self._logits.copy_(self.backend.model.logits(last).float())

    def capture(self, key: tuple[int, int]) -> torch.cuda.CUDAGraph:
        tb, attn_len = key
        if self.warm:
            self.late_captures += 1
            log.warning("pre-fill graph %s captured after warm-up (a stall)", key)
        saved = [b.clone() for b in (self._pos, self._slot)]
        self._slot.fill_(self.cache.scratch_slot)
        self._pos.zero_()
        graph = self.backend.record(lambda: self._forward(tb, attn_len))
        self._pos.copy_(saved[0])
        self._slot.copy_(saved[1])
        self.graphs_by_key[key] = graph
        return graph
