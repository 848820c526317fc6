"""The project's decoder on a *trained* network: SmolLM2-135M (Llama-shaped, which the Qwen2
decoder serves with ``attention_bias=False``), from the GGUF file the default stack ships.

Random weights amplify rounding, so at full size fast and eager greedy tokens part after a
few steps (issue 10, point 5). On a trained network the margins are real: the module forward,
the runner's step as CUDA compiles it (``layer_decode``) and transformers' own implementation
must write the same greedy tokens, in float32 and in bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions
from realtime.models.layers import layer_decode
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM

STEPS = 16
OPTS = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1, 2), len_buckets=(128,))


@pytest.fixture(scope="module")
def smollm(runtime):
    engine = runtime.engine  # the default stack's SmolLM2 engine, loaded once per test run
    tok = engine.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue? Explain it in two sentences."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    ids = list(prompt["input_ids"] if hasattr(prompt, "input_ids") else prompt)
    return engine.model, ids


def ours(hf_model, dtype: torch.dtype) -> Qwen2ForCausalLM:
    cfg = Qwen2Config.from_text_config({**hf_model.config.to_dict(), "attention_bias": False})
    model = Qwen2ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(hf_model.state_dict(), strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing), (missing, unexpected)
    return model.to(dtype).eval()


@torch.inference_mode()
def module_greedy(model: Qwen2ForCausalLM, ids: list[int]) -> list[int]:
    cache = KVCache(model.cfg, 1, 128, "cpu", model.lm_head.weight.dtype)
    slots = torch.tensor(cache.allocate(1))
    out: list[int] = []
    x, pos = torch.tensor(ids), 0
    for _ in range(STEPS):
        logits = model(model.embed(x)[None], torch.arange(pos, pos + len(x))[None], cache, slots)
        pos += len(x)
        out.append(int(logits[0, -1].argmax()))
        x = torch.tensor(out[-1:])
    return out


@torch.inference_mode()
def runner_greedy(model: Qwen2ForCausalLM, ids: list[int]) -> list[int]:
    cache = KVCache(model.cfg, 1, 128, "cpu", model.lm_head.weight.dtype)
    runner = DecodeRunner(model, cache, OPTS)
    runner.backend.layer = layer_decode  # the one-token layer CUDA compiles and graphs
    slot = cache.allocate(1)[0]
    logits = runner.prefill(model.embed(torch.tensor(ids)), slot, 0)
    runner.add_lane(slot, len(ids), LaneSampling(), logits=logits)
    out: list[int] = []
    for _ in range(STEPS):
        out += runner.step()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_and_eager_steps_write_the_same_tokens_on_a_trained_network(smollm, dtype):
    hf_model, ids = smollm
    model = ours(hf_model, dtype)
    eager = module_greedy(model, ids)
    fast = runner_greedy(model, ids)
    assert fast == eager, (fast, eager)
    if dtype == torch.float32:  # and both are transformers' own answer
        ref = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS
        )[0, len(ids) :].tolist()
        assert eager == ref, (eager, ref)
