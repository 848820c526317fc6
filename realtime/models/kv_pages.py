"""The KV cache as one pool of fixed-size pages shared by all sequences (paged attention).

Per layer ``k``/``v`` are ``[num_pages, page_size, kv_heads, head_dim]``. A *sequence* (what
the runner calls a slot: a session's history, or the fork its speaking lane runs on) owns no
memory of its own: it has a row of the block table, the page index for each run of
``page_size`` positions. Pages are taken from a free list as the sequence grows and all of
them go back when it is freed, so many short conversations share memory that fixed
``max_len`` slots would each reserve in full. ``max_len`` stays as a per-sequence cap (the
block table's width, static so that CUDA graphs capture it).

Page 0 is the scratch page: never handed out, every unused block-table entry and the whole
row of the scratch sequence point at it (padding rows of a batched step and graph capture
write there; reads through it are masked). ``block_table`` lives on the device (int32, the
layout ``flash_attn_with_kvcache(..., block_table=...)`` takes); ``tables`` is its host copy
for bookkeeping. Growing a sequence writes one entry of the device table (no sync).

A fork (:meth:`PagedKVCache.copy_prefix`, the speaking lane's copy of a session's prompt)
shares the source's whole pages instead of copying them: each page counts the sequences that
hold it and goes back to the free list when the last one lets go. Only the last, partly filled
page is copied. A write into a shared page (a sequence writing over its own prefix while a
fork still holds it) copies that page first: every writer names where it starts writing
(``ensure(slot, end, start)``). So a fork of a 4k-token prompt costs one page, not sixteen.

Running out of pages raises :class:`KVPoolFull`, an :class:`~realtime.engine.base.EngineBusy`
(the busy answer a full cache already gives), never a crash of other sequences.
"""

from __future__ import annotations

import torch

from realtime.models.qwen2 import KVCache, Qwen2Config


class KVPoolFull(RuntimeError):
    """No free page for a sequence that must grow (the engine turns it into EngineBusy)."""


SCRATCH_PAGE = 0


class PagedKVCache(KVCache):
    """The pool; the same interface as the fixed-slot :class:`KVCache` (``allocate``, ``free``,
    ``ensure``, ``copy_prefix``, ``lengths``, ``scratch_slot``, ``max_len``)."""

    def __init__(
        self,
        cfg: Qwen2Config,
        max_batch: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        page_size: int = 256,
        num_pages: int = 0,
    ) -> None:
        """``max_batch`` sequences at once, each up to ``max_len`` positions (rounded up to
        whole pages), sharing ``num_pages`` pages (0: enough for every sequence at
        ``max_len``, the memory of the old fixed slots) plus the scratch page."""
        if page_size < 1 or max_len < 1 or max_batch < 1:
            raise ValueError("page_size, max_len and max_batch must be positive")
        self.page_size = page_size
        self.pages_per_seq = -(-max_len // page_size)
        self.max_len = self.pages_per_seq * page_size
        self.max_batch = max_batch
        self.num_pages = num_pages or max_batch * self.pages_per_seq
        shape = (self.num_pages + 1, page_size, cfg.num_key_value_heads, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.scratch_slot = max_batch
        self.block_table = torch.full(
            (max_batch + 1, self.pages_per_seq), SCRATCH_PAGE, dtype=torch.int32, device=device
        )
        self.tables: list[list[int]] = [[] for _ in range(max_batch + 1)]
        self.lengths = [0] * (max_batch + 1)
        self._free = list(range(max_batch))
        self._free_pages = list(range(self.num_pages, 0, -1))  # pop() hands out low pages first
        self._holders = [0] * (self.num_pages + 1)  # sequences holding each page
        self._shared = 0  # pages held by more than one sequence (0: writes need no check)

    # ---- sequences ------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self._free_pages)

    full_error = KVPoolFull

    def _release(self, slot: int) -> None:
        """A freed sequence gives back every page it held."""
        self._release_pages(slot, 0)

    # ---- pages ----------------------------------------------------------------------------
    def ensure(self, slot: int, length: int, start: int | None = None) -> None:
        """Pages for positions ``0..length-1`` of ``slot``, and, when it is about to write
        from ``start`` on, its own copy of any page there it shares with a fork;
        :class:`KVPoolFull` if the pool (or the sequence's cap) cannot hold them, with
        nothing taken."""
        if not self.changes(slot, length, start):
            return
        if length > self.max_len:
            raise KVPoolFull(f"context full: {length} > {self.max_len} positions")
        need, shared = self._wants(slot, length, start)
        self._check_free(need + len(shared))
        for i in shared:
            self._unshare(slot, i)
        table = self.tables[slot]
        for _ in range(need):
            page = self._free_pages.pop()
            self._holders[page] = 1
            self.block_table[slot, len(table)].fill_(page)
            table.append(page)

    def changes(self, slot: int, length: int, start: int | None = None) -> bool:
        """Whether :meth:`ensure` with these arguments takes a page, copies one or raises
        (most steps' ``ensure`` does none of them)."""
        if slot == self.scratch_slot:
            return False
        need, shared = self._wants(slot, length, start)
        return length > self.max_len or need + len(shared) > 0

    def _wants(self, slot: int, length: int, start: int | None) -> tuple[int, list[int]]:
        """Pages ``ensure`` must add to ``slot``, and the shared ones it must copy."""
        need = -(-length // self.page_size) - len(self.tables[slot])
        return need, self.shared_pages(slot, start, length) if start is not None else []

    def _check_free(self, wanted: int) -> None:
        if wanted > len(self._free_pages):
            raise KVPoolFull(
                f"KV pool full: {wanted} page(s) of {self.page_size} positions wanted, "
                f"{len(self._free_pages)} of {self.num_pages} free"
            )

    def shared_pages(self, slot: int, start: int, end: int) -> list[int]:
        """Indices (in ``slot``'s table) of the pages that hold positions ``start..end-1`` and
        are shared with another sequence."""
        if not self._shared:
            return []
        table = self.tables[slot]
        last = min(-(-end // self.page_size), len(table))
        return [i for i in range(start // self.page_size, last) if self._holders[table[i]] > 1]

    def _unshare(self, slot: int, i: int) -> None:
        """``slot``'s own copy of the shared page at index ``i`` of its table."""
        old, new = self.tables[slot][i], self._free_pages.pop()
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[new].copy_(kc[old])
            vc[new].copy_(vc[old])
        self._let_go(old)
        self._holders[new] = 1
        self.tables[slot][i] = new
        self.block_table[slot, i].fill_(new)

    def _let_go(self, page: int) -> None:
        self._holders[page] -= 1
        if self._holders[page] == 1:
            self._shared -= 1
        elif self._holders[page] == 0:
            self._free_pages.append(page)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the pages of positions ``0..length-1``, give the rest back."""
        self._release_pages(slot, -(-length // self.page_size))
        self.lengths[slot] = min(self.lengths[slot], length)

    def _release_pages(self, slot: int, keep: int) -> None:
        table = self.tables[slot]
        if len(table) <= keep:
            return
        for page in reversed(table[keep:]):
            self._let_go(page)
        self.block_table[slot, keep:].fill_(SCRATCH_PAGE)
        del table[keep:]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Fork: positions ``0..n-1`` of ``src`` into ``dst``. The whole pages are shared (the
        device block table row copied on the device, no data moved); the last, partly filled
        page is copied into a page of ``dst``'s own."""
        if n > self.max_len:
            raise KVPoolFull(f"context full: {n} > {self.max_len} positions")
        self._release_pages(dst, 0)
        whole = n // self.page_size
        partial = n % self.page_size
        self._check_free(1 if partial else 0)
        pages = self.tables[src][:whole]
        for page in pages:
            self._holders[page] += 1
            if self._holders[page] == 2:
                self._shared += 1
        self.tables[dst] = list(pages)
        if whole:
            self.block_table[dst, :whole].copy_(self.block_table[src, :whole])
        if partial:
            self.ensure(dst, n)
            a, b = (
                self.rows(src, whole * self.page_size, partial),
                self.rows(dst, whole * self.page_size, partial),
            )
            for kc, vc in zip(self.k, self.v, strict=True):
                flat_k, flat_v = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])
                flat_k[b] = flat_k[a]
                flat_v[b] = flat_v[a]
        self.lengths[dst] = n

    def rows(self, slot: int, start: int, n: int) -> torch.Tensor:
        """Flat row indices (into ``k[layer].view(-1, ...)``) of positions ``start..start+n-1``."""
        pos = torch.arange(start, start + n)
        pages = torch.tensor(self.tables[slot], dtype=torch.long)[pos // self.page_size]
        return (pages * self.page_size + pos % self.page_size).to(self.k[0].device)
