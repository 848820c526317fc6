"""The batched one-token step (eager on CPU) against the plain model forward."""

from __future__ import annotations

import torch

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions, sample_tokens
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM

CFG = Qwen2Config.from_text_config(
    {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 101,
        "rope_theta": 10000.0,
    }
)
OPTS = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1, 2, 4), len_buckets=(32,))


def _model() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    m = Qwen2ForCausalLM(CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@torch.no_grad()
def _greedy_reference(model: Qwen2ForCausalLM, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.tolist()
    cache = KVCache(CFG, 1, 64, "cpu", torch.float32)
    slots = torch.tensor([0])
    for _ in range(n):
        t = torch.tensor([ids])
        logits = model(model.embed(t), torch.arange(len(ids))[None], cache, slots)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def test_two_lanes_match_single_sequence_greedy() -> None:
    model = _model()
    prompts = [torch.randint(0, 101, (5,)), torch.randint(0, 101, (9,))]
    expected = [_greedy_reference(model, p, 6) for p in prompts]
    cache = KVCache(CFG, 3, 32, "cpu", torch.float32)
    runner = DecodeRunner(model, cache, OPTS)
    assert runner.attention_name == "sdpa(cpu)"
    slots = cache.allocate(3)[1:]
    for p, slot in zip(prompts, slots, strict=True):
        logits = runner.prefill(model.embed(p), slot, 0)
        runner.add_lane(slot, len(p), LaneSampling(), logits=logits)
    got: list[list[int]] = [[], []]
    for _ in range(6):
        for k, tok in enumerate(runner.step()):
            got[k].append(tok)
    assert got == expected
    # drop lane 0: lane 1 moves into row 0 and goes on unchanged
    runner.remove_lane(0)
    more = [runner.step()[0] for _ in range(2)]
    assert more == _greedy_reference(model, prompts[1], 8)[6:]


@torch.no_grad()
def test_forced_token_and_three_lanes_padded_to_four() -> None:
    model = _model()
    cache = KVCache(CFG, 4, 32, "cpu", torch.float32)
    runner = DecodeRunner(model, cache, OPTS)
    prompt = torch.randint(0, 101, (4,))
    slots = cache.allocate(3)
    for s in slots:
        runner.add_lane(s, 4, LaneSampling(), logits=runner.prefill(model.embed(prompt), s, 0))
    first = runner.step()
    assert len(set(first)) == 1  # same prompt, same greedy token
    runner.force(1, 7)
    second = runner.step()
    assert second[1] == 7 and second[0] == second[2]
    assert cache.lengths[slots[0]] == 6
    assert runner._key()[0] == 4  # three lanes replay the batch-4 step with one padding row


def test_sampling_rows_and_top_k() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    temp = torch.tensor([0.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1.0, 1.0])
    top_k = torch.tensor([0, 0, 1])
    out = sample_tokens(logits, temp, top_p, top_k, greedy_only=False)
    assert out[0] == logits[0].argmax()
    assert out[2] == logits[2].argmax()  # top-k 1 is greedy
    draws = {int(sample_tokens(logits, temp, top_p, top_k, False)[1]) for _ in range(30)}
    assert len(draws) > 1


@torch.no_grad()
def test_fused_decode_layer_matches_sdpa_path() -> None:
    """``layer_decode`` (what is compiled on CUDA) run eagerly gives the same tokens."""
    from realtime.models.decode import layer_decode

    model = _model()
    prompts = [torch.randint(0, 101, (5,)), torch.randint(0, 101, (9,))]
    got = []
    for fused in (False, True):
        cache = KVCache(CFG, 2, 32, "cpu", torch.float32)
        runner = DecodeRunner(model, cache, OPTS)
        if fused:
            runner._layer = layer_decode
        for p, slot in zip(prompts, cache.allocate(2), strict=True):
            runner.add_lane(
                slot, len(p), LaneSampling(), logits=runner.prefill(model.embed(p), slot, 0)
            )
        got.append([runner.step() for _ in range(8)])
    assert got[0] == got[1]
