"""Pre-fill through PyTorch's flash kernel (variable-length form, causal aligned to the keys in
use) must equal the masked SDPA path, for a slot other than 0 and after earlier context."""

from __future__ import annotations

import pytest
import torch

from realtime.models.attention import VarlenFlash
from realtime.models.decode import DecodeRunner, RunnerOptions
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM

CFG = Qwen2Config.from_text_config(
    {
        "hidden_size": 512,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "rope_theta": 10000.0,
    }
)


def test_varlen_arguments_point_at_the_slot_and_the_keys_in_use() -> None:
    positions = torch.arange(10, 18)[None]
    fv = VarlenFlash.for_prefill(positions, torch.tensor([2]), max_len=64, attn_len=128)
    assert fv.cu_q.tolist() == [0, 8]
    assert fv.cu_k.tolist() == [128, 192]  # slot 2 of a 64-position cache, flattened
    assert fv.used_k.tolist() == [18]  # the queries see keys 0..17, the last one its own
    assert (fv.max_q, fv.max_k) == (8, 128)
    assert fv.cu_k.dtype == fv.used_k.dtype == torch.int32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's flash kernel needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
@torch.no_grad()
def test_flash_prefill_equals_masked_sdpa(graphs: bool) -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(CFG).eval().requires_grad_(False).to(torch.bfloat16)
    for p in model.parameters():
        p.normal_(0, 0.05)
    pieces = [torch.randint(0, 300, (n,), device=dev) for n in (11, 5, 40)]
    logits = {}
    for attention in ("auto", "sdpa"):
        opts = RunnerOptions(cuda_graphs=graphs, compile=False, attention=attention)
        cache = KVCache(CFG, 3, 256, dev, torch.bfloat16)
        runner = DecodeRunner(model, cache, opts)
        assert ("torch flash" in runner.attention_name) == (attention == "auto")
        slot, start, out = cache.allocate(2)[1], 0, []
        for ids in pieces:
            out.append(runner.prefill(model.embed(ids), slot, start))
            start += len(ids)
        logits[attention] = torch.stack(out)
    flash, masked = logits["auto"], logits["sdpa"]
    assert ((flash - masked).norm() / masked.norm()).item() < 2e-2
    assert (flash.argmax(-1) == masked.argmax(-1)).all()
