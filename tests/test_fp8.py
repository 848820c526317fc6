"""FP8 decoder weights (``realtime/models/fp8.py``), on the CPU (float32 emulation of the same
FP8 values): the quantisation itself, the runner's step over quantised layers, and the error
on a trained network (SmolLM2-135M) against float32, next to bf16's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.fp8_error import compare
from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions
from realtime.models.fp8 import (
    FP8,
    Fp8Linear,
    dequantize_weight,
    fp8_linear,
    quantize_decoder_,
    quantize_weight,
)
from realtime.models.layers import layer_decode
from realtime.models.qwen2 import KVCache, Qwen2ForCausalLM
from realtime.models.step_audio.config import step_audio_r1_config


def test_weight_quantisation_is_per_channel_and_close():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    q = quantize_weight(w)
    assert q.q.dtype == FP8 and q.scale.shape == (64,)
    back = dequantize_weight(q)
    rel = ((back - w).norm(dim=1) / w.norm(dim=1)).max()
    assert rel < 0.04, rel  # e4m3 keeps 3 mantissa bits: ~2-3 % per row, whatever its size
    x = torch.randn(5, 32)
    y, ref = fp8_linear(x, q), x @ w.t()
    assert ((y - ref).norm() / ref.norm()) < 0.05
    # weight-only: the activations are not quantised
    only = fp8_linear(x, q._replace(act="none"))
    assert torch.allclose(only, x @ back.t(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, x @ back.t(), rtol=1e-4, atol=1e-5)
    # one row (the batch-1 step): a per-tensor scale is the per-token scale
    one = x[:1]
    assert torch.allclose(fp8_linear(one, q), fp8_linear(one, q._replace(act="token")))
    with pytest.raises(ValueError, match="divide by 16"):
        quantize_weight(torch.randn(24, 30))
    with pytest.raises(ValueError, match="activation mode"):
        fp8_linear(x, q._replace(act="int4"))


def _tiny_model() -> Qwen2ForCausalLM:
    cfg = dataclasses.replace(
        step_audio_r1_config().text,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@torch.inference_mode()
def test_runner_step_uses_the_fp8_weights():
    model = _tiny_model()
    ref = model.layer_weights()[0].qkv_w.clone()
    bytes_before = model.weight_bytes()
    saved = quantize_decoder_(model)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear)
    assert isinstance(layer.mlp.down_proj, Fp8Linear)
    assert model.weight_bytes() == bytes_before - saved
    assert (dequantize_weight(model.layer_weights()[0].qkv_w) - ref).abs().max() < 0.05

    def greedy(fast: bool) -> list[int]:
        cache = KVCache(model.cfg, 1, 64, "cpu", torch.float32)
        opts = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1,), len_buckets=(64,))
        runner = DecodeRunner(model, cache, opts)
        if fast:
            runner.backend.layer = layer_decode  # the one-token layer CUDA compiles and graphs
        slot = cache.allocate(1)[0]
        logits = runner.prefill(model.embed(torch.arange(9) * 7), slot, 0)
        runner.add_lane(slot, 9, LaneSampling(), logits=logits)
        return [runner.step()[0] for _ in range(12)]

    assert greedy(True) == greedy(False)
    # and the quantised model is really what runs: zeroing one FP8 weight changes the tokens
    before = greedy(True)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight_fp8.zero_()
        layer.self_attn.o_proj.weight_fp8.zero_()
    assert greedy(True) != before


@pytest.fixture(scope="module")
def smollm(runtime):
    engine = runtime.engine  # the default stack's SmolLM2 engine, loaded once per test run
    return engine.model, engine.tokenizer


def test_fp8_error_on_a_trained_network(smollm):
    """The error FP8 adds on SmolLM2-135M, a small network that e4m3's 3 mantissa bits hurt
    visibly (measured by ``bench/fp8_error.py``, docs/benchmarks.md: cosine 0.976 mean, top-1
    0.79 against float32, where bf16 gives 0.999 and 0.97). The bounds below hold those
    figures with a margin; a wrong scale, layout or cast falls far outside them."""
    hf_model, tokenizer = smollm
    res = compare(hf_model, tokenizer, steps=8, prompts=("Why is the sky blue?",))
    fp8, bf16 = res["fp8"], res["bf16"]
    # logits of the prompt and of 7 teacher-forced steps, against float32
    assert fp8["cosine_mean"] > 0.95, fp8
    assert fp8["cosine_min"] > 0.6, fp8
    assert fp8["top1_agreement"] >= 0.6, fp8
    assert fp8["greedy_prefix_mean"] >= 1, fp8  # the first answer token is the same
    assert fp8["max_abs_diff_rel"] < 0.6, fp8
    # bf16 is closer than FP8 on every figure
    assert bf16["cosine_mean"] > fp8["cosine_mean"] and bf16["top1_agreement"] > 0.9, bf16
    assert res["weight_bytes"]["fp8"] < res["weight_bytes"]["bf16"]  # tied embeddings stay


def test_engine_weights_fp8_quantises_the_decoder_and_answers(tmp_path):
    """``engine.weights: fp8`` on the tiny Step-Audio checkpoint: the decoder's projections are
    FP8 before the cache is sized, and a turn runs through them."""
    import numpy as np
    from step_audio_fixtures import cpu_engine, write_tiny_checkpoint

    from realtime.config import SamplingConfig
    from realtime.engine.base import CancelToken, UserTurn

    path = write_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    plain = cpu_engine(path, max_batch=2)
    engine = cpu_engine(path, max_batch=2, weights="fp8")
    layers = engine.model.decoder.model.layers
    assert all(isinstance(layer.mlp.gate_up_proj, Fp8Linear) for layer in layers)
    assert not isinstance(plain.model.decoder.model.layers[0].mlp.gate_up_proj, Fp8Linear)
    assert engine.model.decoder.weight_bytes() < plain.model.decoder.weight_bytes()
    s = engine.new_session("sys", SamplingConfig(think_budget=4, max_new_tokens=12))
    s.listen(0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    for _ in s.respond(UserTurn(), CancelToken()):
        pass
    assert s.stats.thinking_tokens == 4 and s.stats.generated_tokens > 4
