"""GPU benchmark of issue 4: decode step against the bandwidth floor, and turn latency.

    python bench/gpu_engine.py --part decode     # floor, ms/token at batch 1 and 2, prefill
    python bench/gpu_engine.py --part all        # + turns: end of speech -> first answer token
                                                 #   and -> first audio packet, think budgets

Full-size Step-Audio-R1 shapes with random bf16 weights (no checkpoint; the words mean
nothing). The floor is measured in the same run: weight bytes / device-to-device copy
bandwidth (bytes read + written). Prints a table last and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from realtime.models.decode import DecodeRunner, LaneSampling, RunnerOptions  # noqa: E402
from realtime.models.qwen2 import KVCache, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

R1_TEXT = {
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 158720,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 65536,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_bandwidth(dev: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes per second of a large device-to-device copy, counting read + write."""
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def random_decoder(text: dict[str, Any], dev: torch.device) -> Qwen2ForCausalLM:
    cfg = Qwen2Config.from_text_config(text)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.inv_freq = model.inv_freq.float()
    return model.eval().requires_grad_(False)


def time_steps(runner: DecodeRunner, n: int) -> float:
    """Seconds per step over ``n`` steps (the runner keeps the GPU one step ahead)."""
    for _ in range(5):
        runner.step()
    runner.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        runner.step()
    runner.sync()
    return (time.perf_counter() - t0) / n


def reset_lanes(
    runner: DecodeRunner, slots: list[int], start: int, model: Qwen2ForCausalLM
) -> None:
    runner.clear()
    for s in slots:
        runner.add_lane(s, start, LaneSampling(), token=int(s) + 100)


def prefill_ms(runner: DecodeRunner, model: Qwen2ForCausalLM, slot: int, n: int) -> float:
    emb = torch.randn(n, model.cfg.hidden_size, device=runner.device, dtype=runner.dtype)
    for _ in range(2):
        runner.prefill(emb, slot, 100)
    runner.sync()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        runner.prefill(emb, slot, 100)
        runner.sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def check_small_graph_equals_eager(dev: torch.device) -> dict[str, Any]:
    """fp32 small model: graph (+compile) step tokens == eager step tokens."""
    small = dict(R1_TEXT, hidden_size=256, intermediate_size=512, num_hidden_layers=3)
    small.update(num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    cfg = Qwen2Config.from_text_config(small)
    out: dict[str, Any] = {}
    runs = {}
    for name, opts in {
        "eager": RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1, 2)),
        "graph+compile": RunnerOptions(cuda_graphs=True, compile=True, batch_sizes=(1, 2)),
    }.items():
        torch.manual_seed(0)
        with torch.device(dev):
            m = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.05)
        cache = KVCache(cfg, 2, 1024, dev, torch.float32)
        r = DecodeRunner(m, cache, opts)
        prompt = torch.arange(7, device=dev)
        toks: list[list[int]] = [[], []]
        for k, slot in enumerate(cache.allocate(2)):
            logits = r.prefill(m.embed(prompt + k), slot, 0)
            r.add_lane(slot, 7, LaneSampling(), logits=logits)
        for i in range(40):
            for k, t in enumerate(r.step()):
                toks[k].append(t)
            if i == 20:
                r.remove_lane(0)
        runs[name] = toks
        out[f"{name}_attention"] = r.attention_name
        out[f"{name}_compiled"] = r.compiled
    out["tokens_equal"] = runs["eager"] == runs["graph+compile"]
    return out


def bench_decode(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    dev = torch.device("cuda")
    result["card"] = torch.cuda.get_device_name(dev)
    bw = copy_bandwidth(dev)
    result["copy_bandwidth_TBps"] = bw / 1e12
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s on {result['card']}")
    result["small_check"] = check_small_graph_equals_eager(dev)
    log(f"small graph check {result['small_check']}")
    t0 = time.perf_counter()
    model = random_decoder(R1_TEXT, dev)
    torch.cuda.synchronize()
    result["decoder_build_s"] = time.perf_counter() - t0
    wbytes = model.weight_bytes()
    emb_bytes = model.model.embed_tokens.weight.numel() * 2
    result["weight_bytes"] = wbytes
    result["floor_ms_per_token"] = 1e3 * wbytes / bw
    result["floor_ms_per_token_read_only"] = 1e3 * (wbytes - emb_bytes) / bw
    log(
        f"decoder {wbytes / 1e9:.1f} GB built in {result['decoder_build_s']:.1f}s; "
        f"floor {result['floor_ms_per_token']:.2f} ms/token"
    )
    cache = KVCache(model.cfg, 2, args.max_len, dev, torch.bfloat16)
    slots = cache.allocate(2)
    variants: dict[str, RunnerOptions] = {
        "graph+compile": RunnerOptions(cuda_graphs=True, compile=True, batch_sizes=(1, 2)),
        "graph": RunnerOptions(cuda_graphs=True, compile=False, batch_sizes=(1, 2)),
    }
    if args.eager:
        variants["eager"] = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1, 2))
    timings: dict[str, dict[str, float]] = {}
    runner = None
    for name, opts in variants.items():
        runner = None
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        runner = DecodeRunner(model, cache, opts)
        reset_lanes(runner, slots[:1], 300, model)
        runner.step()
        runner.sync()
        setup = time.perf_counter() - t0
        row = {"setup_s": setup}
        for bs in (1, 2):
            reset_lanes(runner, slots[:bs], 300, model)
            row[f"ms_b{bs}"] = 1e3 * time_steps(runner, args.steps)
        runner.clear()
        timings[name] = row
        result["attention"] = runner.attention_name
        log(f"{name}: {row} attention={runner.attention_name} compiled={runner.compiled}")
    result["step_variants"] = timings
    best = min(timings, key=lambda k: timings[k]["ms_b1"])
    result["step_variant"] = best
    result["ms_per_token_b1"] = timings[best]["ms_b1"]
    result["ms_per_token_b2"] = timings[best]["ms_b2"]
    runner = DecodeRunner(model, cache, variants[best])
    for n in (8, 16, 64, 165):
        result[f"prefill_{n}_ms"] = prefill_ms(runner, model, slots[0], n)
    log(f"prefill 8/16/64/165: {[round(result[f'prefill_{n}_ms'], 1) for n in (8, 16, 64, 165)]}")
    # greedy agreement of the fast step with the eager step at full size (bf16 noise allowed)
    fast_toks = _greedy_run(runner, slots[0], model)
    eager = DecodeRunner(model, cache, RunnerOptions(cuda_graphs=False, compile=False))
    eager_toks = _greedy_run(eager, slots[0], model)
    same = sum(a == b for a, b in zip(fast_toks, eager_toks, strict=True))
    result["full_size_greedy_agreement"] = f"{same}/{len(fast_toks)}"
    log(f"full-size greedy agreement fast vs eager: {same}/{len(fast_toks)}")
    return {"model": model, "cache": cache, "runner_opts": variants[best]}


def _greedy_run(runner: DecodeRunner, slot: int, model: Qwen2ForCausalLM) -> list[int]:
    prompt = torch.arange(16, device=runner.device) * 37
    logits = runner.prefill(model.embed(prompt), slot, 0)
    runner.clear()
    runner.add_lane(slot, 16, LaneSampling(), logits=logits)
    out = [t[0] for t in (runner.step() for _ in range(12))]
    runner.clear()
    return out


def table(result: dict[str, Any]) -> str:
    rows = [
        ("card", result.get("card")),
        ("attention", result.get("attention")),
        ("step variant", result.get("step_variant")),
        ("copy bandwidth TB/s", _f(result.get("copy_bandwidth_TBps"), 3)),
        ("floor ms/token (all weights / bw)", _f(result.get("floor_ms_per_token"))),
        ("ms/token batch 1", _f(result.get("ms_per_token_b1"))),
        ("ms/token batch 2", _f(result.get("ms_per_token_b2"))),
        (
            "batch 1 / floor",
            _f(_ratio(result.get("ms_per_token_b1"), result.get("floor_ms_per_token"))),
        ),
        ("prefill 8 embeddings (640 ms chunk) ms", _f(result.get("prefill_8_ms"))),
    ]
    for k, v in (result.get("turns") or {}).items():
        rows.append(
            (f"budget {k}: EoS -> first answer token p50 s", _f(v.get("first_answer_p50"), 3))
        )
        rows.append(
            (f"budget {k}: EoS -> first audio packet p50 s", _f(v.get("first_packet_p50"), 3))
        )
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def _f(v: Any, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["decode", "all"], default="all")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="also time the eager step")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu-engine.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
    }
    state = bench_decode(args, result)
    if args.part == "all":
        from bench.gpu_engine_turns import bench_turns  # noqa: PLC0415

        result["turns"] = bench_turns(args, state, result)
        result["first_packet_s"] = {
            k: {"p50": v["first_packet_p50"]} for k, v in result["turns"].items()
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


if __name__ == "__main__":
    main()
