"""The fast one-token step of the Qwen2 decoder: lanes, CUDA graphs, GPU sampling.

A *lane* is one sequence being decoded (a row of the batched step); it points at a KV-cache
slot. The runner keeps every per-lane input of the step in static device buffers (``ids``,
``pos``, ``slots``, sampling parameters) so that one step is a single CUDA-graph replay that
embeds, runs all layers, samples the next token on the GPU, writes it back into ``ids`` and
advances ``pos``. Nothing in a step waits for the host.

Read-back without a sync per token: before each replay the tokens about to be fed (which the
previous step sampled) are copied into a pinned ring buffer and an event is recorded; the host
waits on that event only *after* launching the replay, so the GPU is always one step ahead of
the host and never idles. A token is therefore visible to the host as soon as the step that
sampled it finishes. Forcing a token (``</think>`` at the think budget, a fixed prompt suffix)
is a ``fill_`` of the lane's ``ids`` entry before the next replay.

Graphs are captured per (batch size, attention length bucket, sampling mode); the smallest
captured batch size that fits is replayed, extra rows point at the cache's scratch slot.
The layers are the model's own code (``layers.py``): how they are run (attention path,
``torch.compile`` of the layer pieces on CUDA) is ``backend.py``, pre-fill is ``prefill.py``,
sampling is ``sampling.py``. The runner only reads the model: it neither changes its
parameters nor, but for :func:`~realtime.models.backend.configure_compiler`, global settings.
With ``cuda_graphs=False`` and ``compile=False`` the same code runs eagerly (CPU tests).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from realtime.models.backend import DecoderBackend, RunnerOptions
from realtime.models.layers import LayerWeights
from realtime.models.prefill import PREFILL_SIZES, Prefiller, batch_shapes
from realtime.models.qwen2 import KVCache, Qwen2ForCausalLM
from realtime.models.sampling import sample_tokens

log = logging.getLogger(__name__)

__all__ = ["PREFILL_SIZES", "DecodeRunner", "Lane", "LaneSampling", "Rider", "RunnerOptions"]


@dataclass(frozen=True)
class LaneSampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0


@dataclass(frozen=True)
class Rider:
    """A pre-fill piece that rides in a step's spare rows (:meth:`DecodeRunner.step_riding`):
    ``embeds [T, H]`` written into ``slot`` from ``start``, one row per position."""

    embeds: torch.Tensor
    slot: int
    start: int


MAX_RIDERS = 8  # pieces a step carries at most (each one's last logits are kept)


@dataclass
class Lane:
    slot: int
    position: int  # where the next fed token is written
    sampling: LaneSampling = field(default_factory=LaneSampling)


class DecodeRunner:
    """Prefill and the batched one-token step over a :class:`KVCache`."""

    def __init__(self, model: Qwen2ForCausalLM, cache: KVCache, opts: RunnerOptions) -> None:
        self.model = model
        self.cache = cache
        self.opts = opts
        self.backend = DecoderBackend(model, cache, opts)
        self.device, self.dtype = self.backend.device, self.backend.dtype
        self.is_cuda = self.backend.is_cuda
        self.graphs_on = self.is_cuda and opts.cuda_graphs

        fits = tuple(b for b in sorted(opts.batch_sizes) if b <= cache.max_batch)
        self.batch_sizes = (
            fits if fits and fits[-1] == cache.max_batch else (*fits, cache.max_batch)
        )
        max_b = self.batch_sizes[-1]
        dev = self.device
        self.ids = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.slots = torch.full((max_b,), cache.scratch_slot, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(max_b, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(max_b, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(max_b, dtype=torch.long, device=dev)
        # riders (pre-fill pieces in a step's spare rows): their rows' input embeddings, which
        # rows they are, and the logits of each piece's last row
        hidden, vocab = model.cfg.hidden_size, model.cfg.vocab_size
        self.extra = torch.zeros(max_b, hidden, dtype=self.dtype, device=dev)
        self.virtual = torch.zeros(max_b, dtype=torch.bool, device=dev)
        self.rider_last = torch.zeros(MAX_RIDERS, dtype=torch.long, device=dev)
        self.rider_logits = torch.zeros(MAX_RIDERS, vocab, dtype=torch.float32, device=dev)
        self.lanes: list[Lane] = []
        buckets = opts.len_buckets or self._default_buckets(cache.max_len)
        self.buckets = tuple(sorted(b for b in buckets if b <= cache.max_len)) or (cache.max_len,)
        if self.buckets[-1] != cache.max_len:
            self.buckets = (*self.buckets, cache.max_len)
        self.prefiller = Prefiller(self.backend, self.buckets, opts.prefill_chunk, opts.cuda_graphs)
        self._graphs: dict[tuple[int, int, bool, bool], torch.cuda.CUDAGraph] = {}
        self.warm = False  # capture_all ran: any later capture is a stall, logged
        self.late_captures = 0
        ring = 8
        self._ring = torch.zeros((ring, max_b), dtype=torch.long, pin_memory=self.is_cuda)
        self._events = [torch.cuda.Event() if self.is_cuda else None for _ in range(ring)]
        self._step_no = 0

    @staticmethod
    def _default_buckets(max_len: int) -> tuple[int, ...]:
        out, n = [], 512
        while n < max_len:
            out.append(n)
            n *= 2
        return (*out, max_len)

    @property
    def attention_name(self) -> str:
        return self.backend.attention_name

    @property
    def compiled(self) -> bool:
        return self.backend.compiled

    # layers, _record, _sdpa_ctx and _forward_step are also used by bench/gpu_engine.py
    @property
    def layers(self) -> list[LayerWeights]:
        """Each layer's weights (the model's parameters), as the step uses them."""
        return self.model.layer_weights()

    def _record(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        return self.backend.record(fn)

    def _sdpa_ctx(self) -> AbstractContextManager[object]:
        return self.backend.sdpa_ctx()

    # ----- prefill -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Write ``embeds [T, H]`` at positions ``start..`` of ``slot``; logits ``[V]`` of the
        last position (float32, on the device). See ``prefill.py``."""
        return self.prefiller.prefill(embeds, slot, start)

    @torch.no_grad()
    def prefill_batch(
        self,
        embeds: torch.Tensor,
        slots: list[int],
        starts: list[int],
        lengths: list[int],
        lanes: list[int],
    ) -> torch.Tensor:
        """Several sequences' pieces in one pass (``Prefiller.prefill_batch``); logits
        ``[B, V]`` of each piece's last position. ``lanes[i]`` >= 0: piece ``i`` was inserted
        into that lane's sequence at its position (as :meth:`inject`): the lane goes on from
        the piece's end with a token sampled from its logits."""
        logits = self.prefiller.prefill_batch(embeds, slots, starts, lengths)
        for i, k in enumerate(lanes):
            if k >= 0:
                self._resume(k, lengths[i], logits[i])
        return logits

    # ----- lanes -------------------------------------------------------------------------------
    def add_lane(
        self,
        slot: int,
        position: int,
        sampling: LaneSampling,
        *,
        logits: torch.Tensor | None = None,
        token: int | None = None,
    ) -> int:
        """A new row: its first token is ``token`` or sampled from ``logits`` (on the device)."""
        k = len(self.lanes)
        if k >= len(self.ids):
            raise RuntimeError("no free lane")
        self.lanes.append(Lane(slot, position, sampling))
        self.slots[k].fill_(slot)
        self.pos[k].fill_(position)
        self.temperature[k].fill_(sampling.temperature)
        self.top_p[k].fill_(sampling.top_p)
        self.top_k[k].fill_(sampling.top_k)
        if token is not None:
            self.ids[k].fill_(token)
        else:
            assert logits is not None
            first = sample_tokens(
                logits[None],
                self.temperature[k : k + 1],
                self.top_p[k : k + 1],
                self.top_k[k : k + 1],
                greedy_only=sampling.temperature <= 0,
            )
            self.ids[k : k + 1].copy_(first)
        return k

    def remove_lane(self, k: int) -> None:
        """Drop lane ``k``; the last lane moves into its row (device copies, no sync)."""
        last = len(self.lanes) - 1
        if k != last:
            for buf in (self.ids, self.pos, self.slots, self.temperature, self.top_p, self.top_k):
                buf[k].copy_(buf[last])
            self.lanes[k] = self.lanes[last]
        self.lanes.pop()
        self.slots[last].fill_(self.cache.scratch_slot)

    @torch.no_grad()
    def inject(self, k: int, embeds: torch.Tensor) -> None:
        """Insert ``embeds [T, H]`` into lane ``k``'s sequence at its current position (a
        pre-fill), discarding what its last step sampled; the lane goes on from there."""
        lane = self.lanes[k]
        self._resume(k, embeds.shape[0], self.prefill(embeds, lane.slot, lane.position))

    def _resume(self, k: int, n: int, logits: torch.Tensor) -> None:
        """Lane ``k`` after ``n`` positions were pre-filled at its position: it goes on from
        there with a token sampled from ``logits`` (those of the last of them)."""
        lane = self.lanes[k]
        lane.position += n
        self.pos[k].fill_(lane.position)
        first = sample_tokens(
            logits[None],
            self.temperature[k : k + 1],
            self.top_p[k : k + 1],
            self.top_k[k : k + 1],
            greedy_only=lane.sampling.temperature <= 0,
        )
        self.ids[k : k + 1].copy_(first)

    def force(self, k: int, token: int) -> None:
        """Feed ``token`` to lane ``k`` at the next step instead of what was sampled."""
        self.ids[k].fill_(token)

    def clear(self) -> None:
        while self.lanes:
            self.remove_lane(len(self.lanes) - 1)

    # ----- the step ----------------------------------------------------------------------------
    def _forward_step(
        self, bs: int, attn_len: int, greedy_only: bool, riders: bool = False
    ) -> None:
        ids, pos, slots = self.ids[:bs], self.pos[:bs], self.slots[:bs]
        x = self.model.embed(ids)
        if riders:  # the riders' rows take their pieces' embeddings
            x = torch.where(self.virtual[:bs, None], self.extra[:bs], x)
        x = self.backend.step_hidden(x[:, None], pos, slots, attn_len)
        logits = self.model.logits(x[:, 0])
        if riders:
            self.rider_logits.copy_(logits.index_select(0, self.rider_last).float())
        nxt = sample_tokens(
            logits, self.temperature[:bs], self.top_p[:bs], self.top_k[:bs], greedy_only
        )
        ids.copy_(nxt)
        pos.add_(1)

    def _key(self, riders: Sequence[Rider] = ()) -> tuple[int, int, bool, bool]:
        n = len(self.lanes) + sum(r.embeds.shape[0] for r in riders)
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        ends = [r.start + r.embeds.shape[0] for r in riders]
        need = max([lane.position + 1 for lane in self.lanes] + ends)
        if need > self.cache.max_len:
            raise RuntimeError(f"context full: {need} > {self.cache.max_len} positions")
        attn_len = self.buckets[bisect.bisect_left(self.buckets, need)]
        greedy = all(lane.sampling.temperature <= 0 for lane in self.lanes)
        return bs, attn_len, greedy, bool(riders)

    @property
    def room(self) -> int:
        """Rows a step can give to riders now (0 unless ``RunnerOptions.riders``)."""
        return self.batch_sizes[-1] - len(self.lanes) if self.opts.riders else 0

    def _capture(self, key: tuple[int, int, bool, bool]) -> torch.cuda.CUDAGraph:
        bs, attn_len, greedy, riders = key
        if self.warm:
            self.late_captures += 1
            log.warning("decode step graph %s captured after warm-up (a stall)", key)
        saved = [b.clone() for b in (self.ids, self.pos, self.slots)]
        # capture on the scratch slot so that nothing real is overwritten
        self.slots[:bs].fill_(self.cache.scratch_slot)
        self.pos[:bs].fill_(0)
        self.rider_last.zero_()  # rows of this batch size (a stale one could lie past it)
        graph = self.backend.record(lambda: self._forward_step(bs, attn_len, greedy, riders))
        for buf, old in zip((self.ids, self.pos, self.slots), saved, strict=True):
            buf.copy_(old)
        self._graphs[key] = graph
        return graph

    @torch.no_grad()
    def capture_all(self, greedy: bool = True, sample: bool = False) -> int:
        """Capture every graph a conversation can need now (warm-up): each pre-fill size and
        each step batch size, at every attention-length bucket. Returns how many. A graph
        captured later is logged and counted (``late_captures``): it stalls that turn."""
        if not self.graphs_on:
            return 0
        pf = self.prefiller
        for tb in PREFILL_SIZES:
            for attn_len in self.buckets:
                if (tb, attn_len) not in pf.graphs_by_key and tb <= attn_len:
                    pf.capture((tb, attn_len))
        for rows, t in batch_shapes():  # the scheduler's batched passes (``prefill_batch``)
            for attn_len in self.buckets:
                if (rows, t, attn_len) not in pf.batch_graphs and t <= attn_len:
                    pf.capture_batch((rows, t, attn_len))
        modes = [m for m, on in ((True, greedy), (False, sample)) if on]
        carrying = (False, True) if self.opts.riders else (False,)
        for bs in self.batch_sizes:
            for attn_len in self.buckets:
                for g in modes:
                    for r in carrying:
                        if (bs, attn_len, g, r) not in self._graphs:
                            self._capture((bs, attn_len, g, r))
        self.warm = pf.warm = True
        return len(self._graphs) + len(pf.graphs_by_key) + len(pf.batch_graphs)

    @property
    def late_captures_total(self) -> int:
        return self.late_captures + self.prefiller.late_captures

    @torch.no_grad()
    def step(self) -> list[int]:
        """Run one step for all lanes; returns the token each lane was fed at this step
        (the one the previous step sampled or that was forced)."""
        return self.step_riding(())[0]

    @torch.no_grad()
    def step_riding(self, riders: Sequence[Rider]) -> tuple[list[int], torch.Tensor]:
        """:meth:`step`, with ``riders`` pre-filled in the rows the lanes leave free (at most
        :attr:`room` rows, :data:`MAX_RIDERS` pieces): each position of a piece is a row that
        writes its keys and values into the piece's slot and attends to what comes before it
        there, its own piece's earlier rows included (a layer writes every row's keys before
        any row attends). The weights are read once for both; a step of the padded batch size
        costs about the same. Returns the lanes' tokens and the logits ``[len(riders), V]``
        of each piece's last position (float32). Pieces of one slot follow each other."""
        if not self.lanes:
            raise RuntimeError("step with no lanes")
        n = len(self.lanes)
        rows = sum(r.embeds.shape[0] for r in riders)
        if riders and (len(riders) > MAX_RIDERS or rows > self.room):
            raise ValueError(f"{len(riders)} riders of {rows} rows: room for {self.room}")
        key = self._key(riders)
        for lane in self.lanes:  # the position each lane writes (a paged cache takes pages)
            self.cache.ensure(lane.slot, lane.position + 1, lane.position)
        for r in riders:
            self.cache.ensure(r.slot, r.start + r.embeds.shape[0], r.start)
        end = self._seat(riders, n)
        if end < key[0]:
            self.pos[end : key[0]].fill_(0)  # padding rows write position 0 of the scratch slot
        slot = self._step_no % len(self._ring)
        self._step_no += 1
        row = self._ring[slot]
        row[:n].copy_(self.ids[:n], non_blocking=True)
        ev = self._events[slot]
        if ev is not None:
            ev.record()
        if self.graphs_on:
            graph = self._graphs.get(key) or self._capture(key)
            graph.replay()
        else:
            with self.backend.sdpa_ctx():
                self._forward_step(*key)
        logits = self.rider_logits[: len(riders)].clone() if riders else self.rider_logits[:0]
        if riders:  # the rows go back to padding: the scratch slot, no piece
            self.virtual[n:end].fill_(False)
            self.slots[n:end].fill_(self.cache.scratch_slot)
        if ev is not None:
            ev.synchronize()  # the copy above, i.e. the previous step, is done
        for lane in self.lanes:
            lane.position += 1
            self.cache.lengths[lane.slot] = lane.position
        for r in riders:
            self.cache.lengths[r.slot] = max(self.cache.lengths[r.slot], r.start + len(r.embeds))
        return row[:n].tolist(), logits

    def _seat(self, riders: Sequence[Rider], first: int) -> int:
        """Put ``riders`` in the rows from ``first`` on; returns the row after the last."""
        self.rider_last.zero_()  # the unused entries too: each indexes this step's rows
        r = first
        for i, rider in enumerate(riders):
            t = rider.embeds.shape[0]
            self.extra[r : r + t].copy_(rider.embeds)
            self.slots[r : r + t].fill_(rider.slot)
            torch.arange(rider.start, rider.start + t, out=self.pos[r : r + t])
            self.virtual[r : r + t].fill_(True)
            self.rider_last[i].fill_(r + t - 1)
            r += t
        return r

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
