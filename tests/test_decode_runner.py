"""The batched one-token step (eager on CPU) against the plain model forward."""

from __future__ import annotations

import pytest
import torch

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM
from realtime.models.sampling import sample_tokens

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


def test_top_p_boundary_top_k_and_generator() -> None:
    """Nucleus: a token is kept iff the mass ranked above it is below top_p (the token that
    crosses top_p is kept); the top token always is. A generator makes draws reproducible."""
    logits = torch.tensor([0.5, 0.3, 0.2, 1e-9]).log()[None].expand(4, 4)
    temp = torch.ones(4)
    top_p = torch.tensor([0.0, 0.45, 0.55, 1.0])
    top_k = torch.tensor([0, 0, 0, 2])
    gen = torch.Generator().manual_seed(3)
    draws = [sample_tokens(logits, temp, top_p, top_k, generator=gen) for _ in range(300)]
    seen = [set(int(d[row]) for d in draws) for row in range(4)]
    assert seen == [{0}, {0}, {0, 1}, {0, 1}]
    again = torch.Generator().manual_seed(3)
    assert all(
        torch.equal(d, sample_tokens(logits, temp, top_p, top_k, generator=again)) for d in draws
    )


@torch.no_grad()
@pytest.mark.parametrize("step_layer", ["module path", "layer_decode"])
def test_runner_logits_equal_module_forward(step_layer: str, monkeypatch) -> None:
    """Pre-fill and every batched step of the runner give the logits of the module forward
    (``Qwen2ForCausalLM.forward``) on the same tokens, for both step paths: the eager module
    path and ``layer_decode`` (what CUDA compiles). Fails if the two ever diverge."""
    import realtime.models.decode as decode
    from realtime.models.layers import layer_decode

    seen: list[torch.Tensor] = []

    def recording(logits, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(logits.float().clone())
        return sample_tokens(logits, *args, **kwargs)

    monkeypatch.setattr(decode, "sample_tokens", recording)
    model = _model()
    prompts = [torch.randint(0, 101, (5,)), torch.randint(0, 101, (9,))]
    cache = KVCache(CFG, 3, 32, "cpu", torch.float32)
    runner = DecodeRunner(model, cache, OPTS)
    if step_layer == "layer_decode":
        runner.backend.layer = layer_decode
    ref_cache = KVCache(CFG, 2, 32, "cpu", torch.float32)
    slots = cache.allocate(3)[1:]
    ref_slots = torch.tensor(ref_cache.allocate(2))
    for k, (p, slot) in enumerate(zip(prompts, slots, strict=True)):
        logits = runner.prefill(model.embed(p), slot, 0)
        ref = model(
            model.embed(p)[None], torch.arange(len(p))[None], ref_cache, ref_slots[k : k + 1]
        )
        torch.testing.assert_close(logits, ref[0, -1], atol=1e-5, rtol=1e-5)
        runner.add_lane(slot, len(p), LaneSampling(), logits=logits)
    positions = [len(p) for p in prompts]
    for _ in range(5):
        seen.clear()
        fed = runner.step()
        (step_logits,) = seen
        ids = torch.tensor(fed)[:, None]
        pos = torch.tensor(positions)[:, None]
        ref = model(model.embed(ids), pos, ref_cache, ref_slots)
        torch.testing.assert_close(step_logits, ref[:, 0], atol=1e-5, rtol=1e-5)
        positions = [q + 1 for q in positions]


@torch.no_grad()
def test_fused_decode_layer_matches_sdpa_path() -> None:
    """``layer_decode`` (what is compiled on CUDA) run eagerly gives the same tokens."""
    from realtime.models.layers import layer_decode

    model = _model()
    prompts = [torch.randint(0, 101, (5,)), torch.randint(0, 101, (9,))]
    got = []
    for fused in (False, True):
        cache = KVCache(CFG, 2, 32, "cpu", torch.float32)
        runner = DecodeRunner(model, cache, OPTS)
        if fused:
            runner.backend.layer = layer_decode
        for p, slot in zip(prompts, cache.allocate(2), strict=True):
            runner.add_lane(
                slot, len(p), LaneSampling(), logits=runner.prefill(model.embed(p), slot, 0)
            )
        got.append([runner.step() for _ in range(8)])
    assert got[0] == got[1]
