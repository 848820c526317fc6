"""The paged KV pool (realtime/models/kv_pages.py): same tokens as the fixed-slot cache, pages
taken as sequences grow and given back when they are freed, a full pool refuses cleanly."""

from __future__ import annotations

import pytest
import torch

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions
from realtime.models.kv_pages import KVPoolFull, PagedKVCache
from realtime.models.qwen2 import KVCache
from tests.test_decode_runner import CFG, _model

OPTS = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1, 2, 4), len_buckets=(64,))


@torch.no_grad()
def _decode(cache: KVCache, prompts: list[torch.Tensor], steps: int) -> list[list[int]]:
    model = _model()
    runner = DecodeRunner(model, cache, OPTS)
    for p in prompts:
        slot = cache.allocate(1)[0]
        runner.add_lane(
            slot, len(p), LaneSampling(), logits=runner.prefill(model.embed(p), slot, 0)
        )
    got: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        for k, tok in enumerate(runner.step()):
            got[k].append(tok)
    return got


def test_paged_decode_equals_contiguous_cache() -> None:
    torch.manual_seed(5)
    prompts = [torch.randint(0, 101, (n,)) for n in (5, 19, 11)]  # across page edges
    contiguous = _decode(KVCache(CFG, 3, 64, "cpu", torch.float32), prompts, 20)
    paged = PagedKVCache(CFG, 3, 64, "cpu", torch.float32, page_size=8, num_pages=24)
    assert _decode(paged, prompts, 20) == contiguous
    # pages were taken as the sequences grew: 5+20, 19+20, 11+20 positions in pages of 8
    assert paged.pages_used == sum(-(-(n + 20) // 8) for n in (5, 19, 11))
    assert paged.pages_used < 3 * paged.pages_per_seq  # fixed slots would hold 24


def test_many_short_sessions_fit_and_pages_come_back() -> None:
    # a pool the size of 2 fixed slots of 64 positions holds 8 sequences of 16 positions
    cache = PagedKVCache(CFG, 8, 64, "cpu", torch.float32, page_size=8, num_pages=16)
    model = _model()
    runner = DecodeRunner(model, cache, OPTS)
    slots = cache.allocate(8)
    for s in slots:
        runner.prefill(model.embed(torch.randint(0, 101, (16,))), s, 0)
    assert cache.free_pages == 0
    cache.free(slots[:3])
    assert cache.free_pages == 6
    assert cache.block_table[slots[0]].eq(0).all()  # back to the scratch page
    cache.free(slots[3:])
    assert cache.free_pages == cache.num_pages
    assert all(not t for t in cache.tables)


@torch.no_grad()
def test_pool_exhaustion_refuses_one_sequence_and_others_go_on() -> None:
    cache = PagedKVCache(CFG, 3, 64, "cpu", torch.float32, page_size=8, num_pages=5)
    model = _model()
    runner = DecodeRunner(model, cache, OPTS)
    a, b, c = cache.allocate(3)
    torch.manual_seed(3)  # a prompt whose greedy tokens all differ from the one before
    prompt = torch.randint(0, 101, (15,))
    runner.add_lane(a, 15, LaneSampling(), logits=runner.prefill(model.embed(prompt), a, 0))
    runner.prefill(model.embed(torch.randint(0, 101, (24,))), b, 0)  # 3 pages: pool full
    assert cache.free_pages == 0
    with pytest.raises(KVPoolFull, match="KV pool full"):
        runner.prefill(model.embed(prompt), c, 0)
    assert cache.tables[c] == []  # nothing taken by the refused pre-fill
    got = runner.step()  # position 15 is in lane a's second page: no new page needed
    with pytest.raises(KVPoolFull):
        runner.step()  # position 16 needs a third page: refused, nothing advanced
    cache.free([b])
    got += [runner.step()[0] for _ in range(3)]
    expected = _decode(KVCache(CFG, 1, 64, "cpu", torch.float32), [prompt], 4)[0]
    assert got == expected == [41, 42, 41, 6]


def test_sequence_cap_and_truncate() -> None:
    cache = PagedKVCache(CFG, 2, 20, "cpu", torch.float32, page_size=8)
    assert cache.max_len == 24 and cache.num_pages == 6
    (s,) = cache.allocate(1)
    with pytest.raises(KVPoolFull, match="context full"):
        cache.ensure(s, 25)
    cache.ensure(s, 24)
    cache.truncate(s, 9)
    assert len(cache.tables[s]) == 2 and cache.free_pages == 4


def _rows(cache: PagedKVCache, slot: int, n: int) -> torch.Tensor:
    """Keys of positions ``0..n-1`` of ``slot``, every layer."""
    idx = cache.rows(slot, 0, n)
    return torch.stack([k.view(-1, *k.shape[2:])[idx] for k in cache.k])


@torch.no_grad()
def test_a_fork_shares_the_whole_pages_and_copies_only_the_last() -> None:
    cache = PagedKVCache(CFG, 3, 64, "cpu", torch.float32, page_size=8, num_pages=12)
    model = _model()
    runner = DecodeRunner(model, cache, OPTS)
    a, b = cache.allocate(2)
    torch.manual_seed(2)
    prompt = torch.randint(0, 101, (21,))  # two whole pages and 5 positions of a third
    logits = runner.prefill(model.embed(prompt), a, 0)
    cache.copy_prefix(a, b, 21)
    assert cache.pages_used == 4  # 3 + the copied last page, not 6
    assert cache.tables[b][:2] == cache.tables[a][:2] and cache.tables[b][2] != cache.tables[a][2]
    assert torch.equal(_rows(cache, b, 21), _rows(cache, a, 21))
    # both go on from the same prompt: the same greedy tokens, each in its own pages
    runner.add_lane(a, 21, LaneSampling(), logits=logits)
    runner.add_lane(b, 21, LaneSampling(), logits=logits)
    got = [runner.step() for _ in range(12)]
    assert all(x == y for x, y in got)
    alone = _decode(KVCache(CFG, 1, 64, "cpu", torch.float32), [prompt], 12)[0]
    assert [x for x, _ in got] == alone
    cache.free([a])
    assert cache.free_pages == cache.num_pages - len(cache.tables[b])  # b keeps the shared
    cache.free([b])
    assert cache.free_pages == cache.num_pages


@torch.no_grad()
def test_writing_over_a_shared_page_copies_it_first() -> None:
    cache = PagedKVCache(CFG, 3, 64, "cpu", torch.float32, page_size=8, num_pages=12)
    model = _model()
    runner = DecodeRunner(model, cache, OPTS)
    a, b = cache.allocate(2)
    runner.prefill(model.embed(torch.randint(0, 101, (20,))), a, 0)
    cache.copy_prefix(a, b, 16)  # two whole pages, both shared
    before = _rows(cache, b, 16).clone()
    cache.truncate(a, 10)
    assert cache.tables[a] == cache.tables[b]  # still shared: nothing written yet
    runner.prefill(model.embed(torch.randint(0, 101, (9,))), a, 10)  # over page 1 of a
    assert cache.tables[a][0] == cache.tables[b][0]  # page 0 untouched: still shared
    assert cache.tables[a][1] != cache.tables[b][1]  # page 1: a's own copy now
    assert torch.equal(_rows(cache, b, 16), before)  # the fork's prompt is intact
    assert torch.equal(_rows(cache, a, 10), before[:, :10])  # a kept its own first 10
    assert not torch.equal(_rows(cache, a, 16), before)
    cache.free([b, a])
    assert cache.free_pages == cache.num_pages


def test_a_fork_without_a_page_for_its_last_part_takes_nothing() -> None:
    cache = PagedKVCache(CFG, 3, 64, "cpu", torch.float32, page_size=8, num_pages=3)
    a, b = cache.allocate(2)
    cache.ensure(a, 20)  # all three pages
    with pytest.raises(KVPoolFull):
        cache.copy_prefix(a, b, 20)
    assert cache.tables[b] == [] and cache.free_pages == 0
    cache.copy_prefix(a, b, 16)  # whole pages only: needs none
    cache.free([a, b])
    assert cache.free_pages == 3
