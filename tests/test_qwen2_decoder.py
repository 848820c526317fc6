"""The own Qwen2 decoder against transformers' Qwen2ForCausalLM with the same random weights."""

from __future__ import annotations

import pytest
import torch

from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM

TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
}


def _pair(attention_bias: bool = True) -> tuple[Qwen2ForCausalLM, torch.nn.Module]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = Qwen2Config.from_text_config({**TEXT_CONFIG, "attention_bias": attention_bias})
    ours = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    if attention_bias:
        hf_cfg = transformers.Qwen2Config(**TEXT_CONFIG, tie_word_embeddings=False)
        ref = transformers.Qwen2ForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(**TEXT_CONFIG, tie_word_embeddings=False)
        ref = transformers.LlamaForCausalLM(hf_cfg)
    hf_cfg._attn_implementation = "eager"
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    # and back: transformers' state dict loads into a fresh model of ours unchanged
    back = Qwen2ForCausalLM(cfg)
    missing, unexpected = back.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and all("rotary" in u for u in unexpected), (missing, unexpected)
    for (name, p), q in zip(ours.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q), name
    return ours, ref.eval()


def test_config_from_text_config() -> None:
    cfg = Qwen2Config.from_text_config(TEXT_CONFIG)
    assert cfg.head_dim == 16 and cfg.attention_bias and not cfg.tie_word_embeddings
    big = Qwen2Config.from_text_config(
        {
            "hidden_size": 5120,
            "intermediate_size": 27648,
            "num_hidden_layers": 64,
            "num_attention_heads": 40,
            "num_key_value_heads": 8,
            "vocab_size": 158720,
        }
    )
    assert big.head_dim == 128
    assert 32.5e9 < big.num_parameters() < 33.5e9
    with pytest.raises(KeyError, match="vocab_size"):
        Qwen2Config.from_text_config({k: v for k, v in TEXT_CONFIG.items() if k != "vocab_size"})


def test_state_dict_names() -> None:
    cfg = Qwen2Config.from_text_config(TEXT_CONFIG)
    names = set(Qwen2ForCausalLM(cfg).state_dict())
    assert "model.layers.1.self_attn.q_proj.bias" in names
    assert "model.layers.1.self_attn.o_proj.bias" not in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)


@torch.no_grad()
def test_fused_weights_load_and_save_under_checkpoint_names() -> None:
    """q/k/v and gate/up are fused parameters; state dicts show (and take) the parts."""
    cfg = Qwen2Config.from_text_config(TEXT_CONFIG)
    torch.manual_seed(0)
    a, b = Qwen2ForCausalLM(cfg), Qwen2ForCausalLM(cfg)
    params = dict(a.named_parameters())
    assert params["model.layers.0.self_attn.qkv_proj.weight"].shape == (64 + 2 * 32, 64)
    assert params["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    sd = a.state_dict()
    b.load_state_dict(sd)  # strict: the part names are all it takes
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    att, mlp = a.model.layers[1].self_attn, a.model.layers[1].mlp
    assert torch.equal(sd["model.layers.1.self_attn.k_proj.weight"], att.qkv_proj.weight[64:96])
    assert torch.equal(sd["model.layers.1.self_attn.v_proj.bias"], att.qkv_proj.bias[96:])
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"], mlp.gate_up_proj.weight[128:])
    # the parts are views: writing into them (as checkpoint loading does) writes the weight
    a.state_dict(keep_vars=True)["model.layers.1.self_attn.k_proj.weight"].fill_(3.0)
    assert att.qkv_proj.weight[64:96].eq(3.0).all() and not att.qkv_proj.weight[:64].eq(3.0).any()
    del sd["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match="gate_up_proj.weight"):
        b.load_state_dict(sd)


@pytest.mark.parametrize("attention_bias", [True, False])
@torch.no_grad()
def test_prefill_and_decode_match_transformers(attention_bias: bool) -> None:
    ours, ref = _pair(attention_bias)
    ids = torch.randint(0, 97, (2, 12))
    expected = ref(input_ids=ids).logits  # whole sequence at once

    cache = KVCache(ours.cfg, max_batch=3, max_len=32, device="cpu", dtype=torch.float32)
    slots = torch.tensor(cache.allocate(3)[1:])  # rows 1 and 2: not starting at 0
    prefill = 8
    pos = torch.arange(prefill)[None].expand(2, prefill)
    logits = ours(ours.embed(ids[:, :prefill]), pos, cache, slots)
    torch.testing.assert_close(logits, expected[:, :prefill], atol=1e-4, rtol=1e-4)
    last = ours(ours.embed(ids[:, :prefill]), pos, cache, slots, last_only=True, attn_len=16)
    torch.testing.assert_close(last[:, 0], expected[:, prefill - 1], atol=1e-4, rtol=1e-4)
    for t in range(prefill, 12):  # one-token decode steps
        step = ours(ours.embed(ids[:, t : t + 1]), torch.full((2, 1), t), cache, slots, attn_len=16)
        torch.testing.assert_close(step[:, 0], expected[:, t], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_rows_at_different_positions_and_rollback() -> None:
    ours, ref = _pair()
    ids = torch.randint(0, 97, (2, 10))
    expected = ref(input_ids=ids).logits
    cache = KVCache(ours.cfg, max_batch=2, max_len=16, device="cpu", dtype=torch.float32)
    slots = torch.tensor(cache.allocate(2))
    ours(ours.embed(ids[:1, :4]), torch.arange(4)[None], cache, slots[:1])
    ours(ours.embed(ids[1:, :7]), torch.arange(7)[None], cache, slots[1:])
    # speculative junk written at positions 4..5 of row 0, then rolled back by reusing positions
    junk = torch.randint(0, 97, (1, 2))
    ours(ours.embed(junk), torch.tensor([[4, 5]]), cache, slots[:1])
    step_ids = torch.stack([ids[0, 4:5], ids[1, 7:8]])
    step = ours(ours.embed(step_ids), torch.tensor([[4], [7]]), cache, slots)
    torch.testing.assert_close(step[0, 0], expected[0, 4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[1, 0], expected[1, 7], atol=1e-4, rtol=1e-4)


def test_slot_allocation() -> None:
    cfg = Qwen2Config.from_text_config(TEXT_CONFIG)
    cache = KVCache(cfg, max_batch=2, max_len=8, device="cpu", dtype=torch.float32)
    a = cache.allocate(1)
    b = cache.allocate(1)
    assert a != b and cache.free_slots == 0
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.allocate(1)
    cache.free(a)
    assert cache.allocate(1) == a
