"""Tensor parallelism (``realtime/models/tensor_parallel.py``) over gloo on the CPU: the tiny
Step-Audio checkpoint's decoder split over 2 processes writes the same greedy tokens as the
whole decoder in one process, through the same ``DecodeRunner`` (pre-fill, batched steps).
``lm_head`` is split by vocabulary rows: each rank holds its slice (from a state dict and from
the checkpoint) and the gathered logits are world 1's, also with an FP8 ``lm_head``."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from step_audio_fixtures import write_tiny_checkpoint

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions
from realtime.models.fp8 import quantize_lm_head_
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from realtime.models.step_audio.checkpoint import find_checkpoint_files, load_step_audio
from realtime.models.step_audio.config import StepAudioConfig
from realtime.models.step_audio.sharded import build_follower
from realtime.models.tensor_parallel import (
    local_config,
    set_group,
    shard_slice,
    shard_state_dict,
    splits_vocab,
    world_size,
)

STEPS = 12
PROMPTS = ([5, 17, 300, 4000, 151690, 12], [9, 9, 800, 70])
OPTS = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1, 2), len_buckets=(64,))


def decoder(path: str) -> Qwen2ForCausalLM:
    return load_step_audio(path, device="cpu", dtype=torch.float32).model.decoder


def shard(cfg, state: dict, rank: int, world: int) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(local_config(cfg, world))
    model.load_state_dict(shard_state_dict(state, rank, world), strict=False)
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def greedy(model: Qwen2ForCausalLM) -> list[list[int]]:
    """Two lanes decoded together: the tokens each was fed."""
    cache = KVCache(model.cfg, 2, 64, "cpu", torch.float32)
    runner = DecodeRunner(model, cache, OPTS)
    for slot, ids in zip(cache.allocate(2), PROMPTS, strict=True):
        logits = runner.prefill(model.embed(torch.tensor(ids)), slot, 0)
        runner.add_lane(slot, len(ids), LaneSampling(), logits=logits)
    out: list[list[int]] = [[], []]
    for _ in range(STEPS):
        for k, t in enumerate(runner.step()):
            out[k].append(t)
    return out


def _worker(rank: int, world: int, port: int, cfg, state: dict, results: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        set_group(dist.group.WORLD)
        assert world_size() == world
        model = shard(cfg, state, rank, world)
        per_rank = sum(p.numel() for p in model.model.layers.parameters())
        results[rank] = (greedy(model), per_rank, model.cfg.num_key_value_heads)
    finally:
        set_group(None)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tp") / "ckpt"))


def test_two_ranks_over_gloo_write_the_tokens_of_one(tiny_path):
    full = decoder(tiny_path)
    expected = greedy(full)
    assert len(set(expected[0])) > 3  # the tiny random model does not just repeat one token

    world, port = 2, _free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        args = (world, port, full.cfg, full.state_dict(), results)
        mp.spawn(_worker, args=args, nprocs=world, join=True)
        results = dict(results)
    assert sorted(results) == [0, 1]
    whole = sum(p.numel() for p in full.model.layers.parameters())
    for rank in range(world):
        tokens, per_rank, kv_heads = results[rank]
        assert tokens == expected, (rank, tokens, expected)
        # each rank holds its share of the layers (norms replicated) and of the KV heads
        assert per_rank < 0.6 * whole
        assert kv_heads == full.cfg.num_key_value_heads // world


@torch.inference_mode()
def greedy_logits(model: Qwen2ForCausalLM) -> torch.Tensor:
    """The two prompts pre-filled one by one, then decoded together greedily through the
    model's own forward (``logits``: the gather under a split ``lm_head``); every logits row
    the tokens were picked from, ``[STEPS + 1, 2, V]``."""
    cache = KVCache(model.cfg, 2, 64, "cpu", torch.float32)
    slots = cache.allocate(2)
    rows, pos = [], []
    for slot, ids in zip(slots, PROMPTS, strict=True):
        x = model.embed(torch.tensor(ids))[None]
        at = torch.arange(len(ids))[None]
        rows.append(model(x, at, cache, torch.tensor([slot]), last_only=True)[0, 0])
        pos.append(len(ids))
    out = [torch.stack(rows)]
    pos_t, slots_t = torch.tensor(pos), torch.tensor(slots)
    for _ in range(STEPS):
        ids = out[-1].argmax(-1)
        logits = model(model.embed(ids)[:, None], pos_t[:, None], cache, slots_t)
        out.append(logits[:, 0])
        pos_t = pos_t + 1
    return torch.stack(out).float()


def _logits_worker(rank: int, world: int, port: int, path: str, out_dir: str) -> None:
    """Rank ``rank``'s decoder loaded from the checkpoint (its slices only): its logits with
    the bf16 ``lm_head``, then with an FP8 one, saved for the test to compare."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        set_group(dist.group.WORLD)
        cfg = StepAudioConfig.from_file(find_checkpoint_files(path).config)
        model = build_follower(cfg, rank, world, torch.device("cpu"), torch.float32, path)
        head = model.lm_head.weight.shape
        plain = greedy_logits(model)
        quantize_lm_head_(model)
        fp8 = greedy_logits(model)
        torch.save({"head": head, "plain": plain, "fp8": fp8}, f"{out_dir}/rank{rank}.pt")
    finally:
        set_group(None)
        dist.destroy_process_group()


def test_split_lm_head_gathers_the_logits_of_one(tiny_path, tmp_path):
    """Each rank computes the logits of its half of the vocabulary and the ranks gather them:
    at every step every rank has world 1's full logits (the same argmax: the same tokens),
    with the bf16 ``lm_head`` and with the FP8 one (per-row scales split with the rows; the
    rank's 75850 rows are padded to 16 and cut back). A gather that dropped, swapped or
    misplaced a slice would move these logits."""
    full = decoder(tiny_path)
    vocab = full.cfg.vocab_size
    plain = greedy_logits(full)
    quantize_lm_head_(full)
    fp8 = greedy_logits(full)
    assert plain.shape == (STEPS + 1, 2, vocab)
    # the argmax of the steps falls in both halves: a wrong half would show
    picks = plain.argmax(-1)
    assert (picks < vocab // 2).any() and (picks >= vocab // 2).any(), picks

    world = 2
    mp.spawn(_logits_worker, args=(world, _free_port(), tiny_path, str(tmp_path)), nprocs=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert tuple(got["head"]) == (vocab // world, full.cfg.hidden_size)
        assert got["plain"].shape == plain.shape
        torch.testing.assert_close(got["plain"], plain, rtol=1e-4, atol=1e-4)
        assert torch.equal(got["plain"].argmax(-1), picks)
        torch.testing.assert_close(got["fp8"], fp8, rtol=1e-2, atol=2e-2)
        assert torch.equal(got["fp8"].argmax(-1), fp8.argmax(-1))


def _gather_worker(rank: int, world: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    from realtime.models.tensor_parallel import gather_vocab

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        set_group(dist.group.WORLD)
        full = torch.randn(3, 2, 8 * world, generator=torch.Generator().manual_seed(1))
        mine = full[..., rank * 8 : (rank + 1) * 8]  # not contiguous, as a padded FP8 head's
        traced = torch.compile(
            lambda t: gather_vocab(t * 2, world), backend="aot_eager", fullgraph=True
        )
        results[rank] = (
            torch.equal(gather_vocab(mine, world), full),
            torch.equal(traced(mine), 2 * full),
        )
    finally:
        set_group(None)
        dist.destroy_process_group()


def test_the_vocab_gather_eager_and_traced_by_torch_compile():
    """``gather_vocab`` eagerly (``all_gather_into_tensor``) and traced by ``torch.compile``
    (the functional all-gather): rows of any leading shape, slices in rank order."""
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(world, _free_port(), results), nprocs=world)
        results = dict(results)
    assert results == {0: (True, True), 1: (True, True)}


def test_each_rank_holds_its_vocab_slice_of_lm_head(tiny_path):
    """From a state dict (``shard_state_dict``), from the checkpoint (safetensors slices:
    ``build_follower``, and rank 0 through ``load_step_audio``): rank ``r``'s ``lm_head`` is
    rows ``r * V / 2 ..`` of the whole one, the embeddings stay whole."""
    full = decoder(tiny_path)
    head, emb = full.lm_head.weight, full.model.embed_tokens.weight
    v, world = full.cfg.vocab_size, 2
    n = v // world
    local = local_config(full.cfg, world)
    assert local.vocab_shards == world and local.vocab_size == v and local.head_rows == n
    step_cfg = StepAudioConfig.from_file(find_checkpoint_files(tiny_path).config)
    cpu = torch.device("cpu")
    rank0 = load_step_audio(tiny_path, device="cpu", dtype=torch.float32, world=world)
    for rank in range(world):
        rows = slice(rank * n, (rank + 1) * n)
        from_state = shard(full.cfg, full.state_dict(), rank, world)
        from_ckpt = build_follower(step_cfg, rank, world, cpu, torch.float32, tiny_path)
        models = [from_state, from_ckpt] + ([rank0.model.decoder] if rank == 0 else [])
        for m in models:
            assert m.lm_head.weight.shape == (n, full.cfg.hidden_size)
            assert torch.equal(m.lm_head.weight, head[rows])
            assert torch.equal(m.model.embed_tokens.weight, emb)
    # half the head's bytes per rank (the layers' share besides)
    saved = full.weight_bytes() - from_ckpt.weight_bytes()
    assert saved > n * full.cfg.hidden_size * 4


def test_lm_head_stays_whole_when_tied_or_the_vocabulary_does_not_divide():
    """The rule (``splits_vocab``): split only an untied ``lm_head`` whose rows divide by the
    world; tied, it is the embeddings (which every rank needs whole); otherwise replicated."""
    base = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96,
    )  # fmt: skip
    tied = dataclasses.replace(base, tie_word_embeddings=True)
    odd = dataclasses.replace(base, vocab_size=97)
    assert splits_vocab(base, 2) and not splits_vocab(base, 1)
    assert not splits_vocab(tied, 2) and not splits_vocab(odd, 2)
    assert local_config(base, 2).vocab_shards == 2
    assert local_config(base, 2, split_vocab=False).vocab_shards == 1
    for cfg in (tied, odd):
        assert local_config(cfg, 2).vocab_shards == 1
    assert shard_slice("lm_head.weight", (97, 32), 1, 2) == (slice(None), slice(None))
    assert shard_slice("lm_head.weight", (96, 32), 1, 2) == (slice(48, 96), slice(None))
    assert shard_slice("lm_head.weight", (96, 32), 1, 2, split_vocab=False)[0] == slice(None)
    torch.manual_seed(0)
    for cfg in (base, tied, odd):
        whole = Qwen2ForCausalLM(cfg)
        state = whole.state_dict()
        for rank in range(2):
            m = shard(cfg, state, rank, 2)
            rows = m.lm_head.weight.shape[0]
            assert rows == (48 if cfg is base else cfg.vocab_size), cfg
            if cfg.tie_word_embeddings:
                assert m.lm_head.weight is m.model.embed_tokens.weight
    with pytest.raises(ValueError, match="untied"):
        Qwen2ForCausalLM(dataclasses.replace(tied, vocab_shards=2))
    # a split head needs its group: without one, a clear error (not half the logits)
    m = shard(base, Qwen2ForCausalLM(base).state_dict(), 0, 2)
    with pytest.raises(RuntimeError, match="split over 2 ranks"):
        m.logits(torch.zeros(1, 32))


def test_shard_sizes_and_divisibility(tiny_path):
    full = decoder(tiny_path)
    parts = [shard_state_dict(full.state_dict(), r, 2) for r in range(2)]
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([p[q] for p in parts], 0), full.state_dict()[q])
    assert torch.equal(torch.cat([p[o] for p in parts], 1), full.state_dict()[o])
    with pytest.raises(ValueError, match="divide"):
        local_config(full.cfg, 3)


def test_random_shards_are_the_parts_of_the_whole_random_model():
    """``step-audio-random`` under tensor parallelism: each rank's shard of the random weights
    (drawn in full from the same seed, its part kept) is its part of world 1's weights, so
    world 2 computes what world 1 does; rank 0 also holds world 1's encoder."""
    from step_audio_fixtures import tiny_config

    from realtime.models.step_audio.model import build_empty, checkpoint_name, fill_random
    from realtime.models.step_audio.sharded import build_follower, build_rank0

    cfg, cpu = tiny_config(), torch.device("cpu")
    whole = build_empty(cfg, cpu, torch.float32)
    fill_random(whole, seed=4)
    full = {checkpoint_name(k): v for k, v in whole.state_dict().items()}
    rank0 = build_rank0(cfg, 2, cpu, torch.float32, None, seed=4)
    rank1 = build_follower(cfg, 1, 2, cpu, torch.float32, None, seed=4)
    assert rank0.decoder_cfg.num_attention_heads == 2 and rank1.cfg.num_key_value_heads == 1
    parts = [
        {checkpoint_name(k): v for k, v in rank0.state_dict().items()},
        dict(rank1.state_dict()),
    ]
    assert set(parts[1]) < set(parts[0]) and not any(k.startswith("encoder") for k in parts[1])
    for name, t in parts[0].items():
        if not name.startswith(("model.", "lm_head")):
            assert torch.equal(t, full[name]), name  # the encoder and adapter, whole
    expected = [shard_state_dict({k: full[k] for k in parts[1]}, r, 2) for r in range(2)]
    for rank in range(2):
        for name in parts[1]:
            assert torch.equal(parts[rank][name], expected[rank][name]), (rank, name)


class _FakeSymmOps:
    """Stands in for ``torch.ops.symm_mem`` (CUDA only): records the calls; a 'sum' over one
    rank is the input itself."""

    def __init__(self, with_copy: bool) -> None:
        self.calls: list[str] = []
        if with_copy:
            self.one_shot_all_reduce_copy = self._copy

    def one_shot_all_reduce(self, buf, op, group):
        self.calls.append("one_shot_all_reduce")
        return buf.clone()

    def _copy(self, buf, local, op, group):
        assert buf.shape == local.shape and local.is_contiguous()  # the kernel's checks
        self.calls.append("one_shot_all_reduce_copy")
        return local.clone()


@pytest.mark.parametrize("with_copy", [True, False])
def test_symmetric_memory_all_reduce_copies_in_the_kernel_when_it_can(monkeypatch, with_copy):
    """With ``one_shot_all_reduce_copy`` the partial sum goes to the kernel as is (no
    ``copy_`` into the symmetric buffer first); without it, the old copy then one-shot."""
    import realtime.models.tensor_parallel as tp

    fake = _FakeSymmOps(with_copy)
    monkeypatch.setattr(torch.ops, "symm_mem", fake)
    monkeypatch.setattr(tp, "_group", object())
    buf = torch.zeros(64)
    monkeypatch.setattr(tp, "_symm", (buf, "g", tp._has_copy_kernel()))
    assert tp.all_reduce_kind() == ("symm-mem one-shot copy" if with_copy else "symm-mem one-shot")
    t = torch.arange(12.0).reshape(3, 4)
    out = tp.all_reduce(t)
    assert torch.equal(out, t) and out.shape == (3, 4)
    if with_copy:
        assert fake.calls == ["one_shot_all_reduce_copy"] and not buf.any()  # no copy_ first
    else:
        assert fake.calls == ["one_shot_all_reduce"] and torch.equal(buf[:12], t.reshape(-1))
