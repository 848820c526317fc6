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
    calibrate_activations_,
    dequantize_weight,
    fp8_linear,
    quantize_activation,
    quantize_activation_static,
    quantize_decoder_,
    quantize_lm_head_,
    quantize_weight,
    scaled_product,
    set_activation_mode,
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


def _tiny_model(vocab_size: int = 300) -> Qwen2ForCausalLM:
    cfg = dataclasses.replace(
        step_audio_r1_config().text,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
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
    res = compare(
        hf_model, tokenizer, steps=8, prompts=("Why is the sky blue?",),
        variants=("fp8_static_head",),
    )  # fmt: skip
    fp8, bf16 = res["fp8"], res["bf16"]
    # logits of the prompt and of 7 teacher-forced steps, against float32; the faster
    # variant (static activation scales calibrated on another text, FP8 lm_head) within the
    # same bounds (bench/results/fp8-error-variants.json: no worse on the logits)
    for r in (fp8, res["fp8_static_head"]):
        assert r["cosine_mean"] > 0.95, r
        assert r["cosine_min"] > 0.6, r
        assert r["top1_agreement"] >= 0.6, r
        assert r["greedy_prefix_mean"] >= 1, r  # the first answer token is the same
        assert r["max_abs_diff_rel"] < 0.6, r
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


def test_static_activation_scale_agrees_with_the_dynamic_one_and_clips_beyond_it():
    """``act="static"``: one calibrated scale per projection instead of an ``amax`` per step.
    Inside the calibrated range its product is as close to the exact one as the dynamic
    per-token product; beyond ``margin`` times that range the input clips (the cost)."""
    torch.manual_seed(1)
    w = torch.randn(96, 64) * 0.05
    packed = quantize_weight(w)
    x = torch.randn(6, 64)
    exact = x @ w.t()
    lin = Fp8Linear(torch.nn.Linear(64, 96, bias=False))
    lin.weight_fp8.copy_(packed.q)
    lin.weight_scale.copy_(packed.scale)
    with pytest.raises(ValueError, match="calibrate"):
        set_activation_mode(lin, "static")
    with pytest.raises(ValueError, match="needs a calibrated"):
        fp8_linear(x, packed._replace(act="static"))
    with pytest.raises(ValueError, match="no input"):
        calibrate_activations_(lin, lambda: None)
    assert lin.act == "auto"  # a failed calibration leaves the mode as it was
    seen = calibrate_activations_(lin, lambda: lin(x), margin=2.0)
    assert seen[""] == pytest.approx(float(x.abs().max()))
    assert lin.act == "static"
    assert float(lin.input_scale) == pytest.approx(2.0 * float(x.abs().max()) / 448)

    def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
        return float((y - ref).norm() / ref.norm())

    dynamic = fp8_linear(x, packed._replace(act="token"))
    static = lin(x)
    assert rel(static, exact) < 0.05 and rel(static, dynamic) < 0.05
    assert rel(static, exact) < 1.5 * rel(dynamic, exact)
    # one row (the batch-1 step) takes the same scale
    assert rel(lin(x[:1]), exact[:1]) < 0.05
    # an input 8x beyond the calibrated range (4x beyond the margin) is clipped
    big = 8 * x
    assert rel(lin(big), 8 * exact) > 0.3
    assert rel(fp8_linear(big, packed._replace(act="token")), 8 * exact) < 0.05


def test_scaled_mm_arguments_match_the_emulation():
    """The ``torch._scaled_mm`` calls CUDA makes (row-wise scales, per-tensor scale, the
    static scale repeated per row) give the emulation's product. Run through PyTorch's CPU
    ``_scaled_mm`` where it has one, so that a wrong scale shape fails here, not on the GPU."""
    torch.manual_seed(2)
    w = quantize_weight(torch.randn(48, 32) * 0.1)
    x = torch.randn(5, 32)
    cases = []
    for rowwise in (True, False):
        xq, sx = quantize_activation(x, rowwise)
        cases.append((xq, sx, rowwise))
    s = torch.tensor(0.01)
    xq = quantize_activation_static(x, s)
    cases.append((xq, s.reshape(1, 1).expand(5, 1).contiguous(), True))
    cases.append((xq[:1], s.reshape(1, 1), False))
    for xq, sx, rowwise in cases:
        emu = (xq.float() @ w.q.float().t()) * sx * w.scale[None, :]
        try:
            y = scaled_product(xq, sx, w, rowwise, torch.float32)
        except (NotImplementedError, RuntimeError) as exc:
            if "CPU" in str(exc) or "not implemented" in str(exc).lower():
                pytest.skip(f"no CPU _scaled_mm in this torch: {exc}")
            raise
        assert y.shape == emu.shape
        assert float((y - emu).norm() / emu.norm()) < 0.01  # bf16 output rounding only


@torch.inference_mode()
@pytest.mark.parametrize(("tied", "vocab"), [(False, 320), (True, 300)])
def test_fp8_lm_head_and_static_scales_in_the_runner_step(tied, vocab):
    """``quantize_lm_head_`` (its own FP8 copy when tied: the embeddings stay; a vocabulary
    that does not divide by 16 padded and cut back) and static scales: the runner's one-token
    step gives the module path's tokens, and its logits stay close to the bf16 head's."""
    model = _tiny_model(vocab_size=vocab)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    quantize_decoder_(model)
    emb_before = model.model.embed_tokens.weight.clone()
    hidden = torch.randn(3, 64)
    ref = model.logits(hidden)
    saved = quantize_lm_head_(model)
    assert isinstance(model.lm_head, Fp8Linear)
    assert (saved < 0) == tied  # tied: an FP8 copy beside the embeddings
    assert torch.equal(model.model.embed_tokens.weight, emb_before)
    assert quantize_lm_head_(model) == 0  # twice: nothing more
    head = model.logits(hidden)
    assert head.shape == ref.shape == (3, vocab)
    assert float((head - ref).norm() / ref.norm()) < 0.06

    def greedy(fast: bool) -> list[int]:
        cache = KVCache(model.cfg, 1, 64, "cpu", torch.float32)
        opts = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1,), len_buckets=(64,))
        runner = DecodeRunner(model, cache, opts)
        if fast:
            runner.backend.layer = layer_decode
        slot = cache.allocate(1)[0]
        logits = runner.prefill(model.embed(torch.arange(9) * 7), slot, 0)
        runner.add_lane(slot, 9, LaneSampling(), logits=logits)
        return [runner.step()[0] for _ in range(12)]

    dynamic = greedy(True)
    calib = KVCache(model.cfg, 1, 64, "cpu", torch.float32)
    slots = torch.tensor(calib.allocate(1))
    ids = torch.arange(20)[None] * 11 % model.cfg.vocab_size
    calibrate_activations_(
        model, lambda: model(model.embed(ids), torch.arange(20)[None], calib, slots)
    )
    assert model.lm_head.act == "static"
    assert all(float(m.input_scale) > 0 for m in model.modules() if isinstance(m, Fp8Linear))
    static = greedy(True)
    assert static == greedy(False)
    assert sum(a == b for a, b in zip(static, dynamic, strict=True)) >= 6, (static, dynamic)


def test_engine_fp8_lm_head_and_static_scales(tmp_path):
    """``engine.fp8_lm_head`` and ``engine.fp8_activations: static`` on the tiny Step-Audio
    checkpoint: ``lm_head`` is FP8 (its vocabulary padded to 16), every projection has a
    calibrated scale before the runner exists, and a turn runs through them. The options
    without ``weights: fp8``, or static scales under tensor parallelism, are refused."""
    import numpy as np
    from step_audio_fixtures import cpu_engine, write_tiny_checkpoint

    from realtime.config import SamplingConfig
    from realtime.engine.base import CancelToken, UserTurn

    path = write_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    with pytest.raises(ValueError, match="need engine.weights: fp8"):
        cpu_engine(path, max_batch=2, fp8_lm_head=True)
    with pytest.raises(ValueError, match="tensor_parallel: 1"):
        cpu_engine(path, weights="fp8", fp8_activations="static", tensor_parallel=2)
    engine = cpu_engine(
        path, max_batch=2, weights="fp8", fp8_lm_head=True, fp8_activations="static"
    )
    dec = engine.model.decoder
    assert isinstance(dec.lm_head, Fp8Linear)
    fp8 = [m for m in dec.modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 4 * len(dec.model.layers) + 1
    assert all(m.act == "static" and float(m.input_scale) > 0 for m in fp8)
    s = engine.new_session("sys", SamplingConfig(think_budget=4, max_new_tokens=12))
    s.listen(0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    for _ in s.respond(UserTurn(), CancelToken()):
        pass
    assert s.stats.thinking_tokens == 4 and s.stats.generated_tokens > 4


@torch.inference_mode()
def test_gpu_serving_fp8_variants_run_through_the_runner():
    """``bench/gpu_serving.py --part fp8``'s variant loop (calibration, lm_head swaps, runner
    options) on a tiny model on the CPU, so that a device run does not fail on it: every
    variant gives a row, the model ends as the fastest one with the other head freed."""
    from bench import gpu_serving as gs

    model = _tiny_model(vocab_size=320)
    quantize_decoder_(model)
    cache = KVCache(model.cfg, 2, 128, "cpu", torch.float32)
    slots = cache.allocate(2)
    opts = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1,), len_buckets=(128,))
    seen: list[int] = []
    variants = gs.parse_variants(",".join(gs.FP8_VARIANTS))
    res = gs.fp8_variant_tables(
        model, cache, slots, 1, opts, variants, lambda r: seen.append(len(r)), (1,)
    )
    assert not [k for k in res if k.endswith("_error")], res
    assert all(res[f"{v}_ms_per_step"]["b1"] > 0 for v in variants)
    assert len(seen) == len(variants)
    best = gs.FP8_VARIANTS[res["fp8_variant"]]
    assert isinstance(model.lm_head, Fp8Linear) == (best.head == "fp8")
    gs.set_variant(model, gs.FP8_VARIANTS["fp8_static_head_small_gemv"], {"fp8": model.lm_head})
    layer = model.model.layers[0]
    assert (layer.self_attn.o_proj.act, layer.mlp.down_proj.act) == ("none", "static")
    with pytest.raises(SystemExit, match="fp8_nope"):
        gs.parse_variants("fp8_auto,fp8_nope")
