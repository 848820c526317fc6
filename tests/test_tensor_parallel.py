"""Tensor parallelism (``realtime/models/tensor_parallel.py``) over gloo on the CPU: the tiny
Step-Audio checkpoint's decoder split over 2 processes writes the same greedy tokens as the
whole decoder in one process, through the same ``DecodeRunner`` (pre-fill, batched steps)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from step_audio_fixtures import write_tiny_checkpoint

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions
from realtime.models.qwen2 import KVCache, Qwen2ForCausalLM
from realtime.models.step_audio.checkpoint import load_step_audio
from realtime.models.tensor_parallel import (
    local_config,
    set_group,
    shard_state_dict,
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
