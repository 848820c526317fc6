"""GPU benchmark of issue 4: decode step against the bandwidth floor, and turn latency.

    python bench/gpu_engine.py --part decode     # floor, ms/token at batch 1 and 2, prefill
    python bench/gpu_engine.py --part all        # + turns: end of speech -> first answer token
                                                 #   and -> first audio packet, think budgets

Full-size Step-Audio-R1 shapes with random bf16 weights (no checkpoint; the words mean
nothing). The floor is measured in the same run: weight bytes / device-to-device copy
bandwidth (bytes read + written). Prints a table last and writes JSON (``--out``).

ENGINE-ONLY: the turn figures drive the engine directly (no Session, VAD or output stage, a
fixed 400 ms endpoint, a canned text into the TTS). What a user hears is measured by
``bench/pipeline_bench.py``. Over 400 lines because its parts run in one device call (a GPU
machine is costly to start), sharing one loaded model.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from realtime.models.step_audio.config import step_audio_r1_config  # noqa: E402
from realtime.models.step_audio.model import random_step_audio  # noqa: E402


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


def gemv_only_ms(runner: DecodeRunner, bs: int = 1, reps: int = 20) -> float:
    """The matrix products of one step alone, captured in one graph: what cuBLAS reaches."""
    dev = runner.device
    x = torch.randn(bs, runner.model.cfg.hidden_size, device=dev, dtype=runner.dtype)
    inter = torch.randn(bs, runner.model.cfg.intermediate_size, device=dev, dtype=runner.dtype)
    attn = torch.randn(bs, runner.model.cfg.hidden_size, device=dev, dtype=runner.dtype)

    def fn() -> None:
        for lw in runner.layers:
            torch.nn.functional.linear(x, lw.qkv_w, lw.qkv_b)
            torch.nn.functional.linear(attn, lw.o_w)
            torch.nn.functional.linear(x, lw.gu_w)
            torch.nn.functional.linear(inter, lw.down_w)
        runner.model.lm_head(x)

    graph = runner._record(fn)
    graph.replay()
    runner.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    runner.sync()
    return 1e3 * (time.perf_counter() - t0) / reps


def kernel_breakdown(runner: DecodeRunner, steps: int = 3) -> list[tuple[str, float]]:
    """Top kernels (ms per step) of the un-graphed step, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with runner._sdpa_ctx():
                runner._forward_step(len(runner.lanes), 512, True)
        runner.sync()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            rows.append((ev.key[:70], t / 1e3 / steps, ev.count // steps))
    rows.sort(key=lambda r: -r[1])
    return rows[:14]


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
    cfg = dataclasses.replace(
        step_audio_r1_config().text,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    torch.manual_seed(0)
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
    full = random_step_audio(device=dev, dtype=torch.bfloat16)
    model = full.decoder
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
        "graph+compile(reduction attention)": RunnerOptions(
            cuda_graphs=True, compile=True, batch_sizes=(1, 2), triton_attention=False
        ),
        "graph+compile(split reductions)": RunnerOptions(
            cuda_graphs=True, compile=True, batch_sizes=(1, 2), split_reductions=True
        ),
        "graph": RunnerOptions(cuda_graphs=True, compile=False, batch_sizes=(1, 2)),
    }
    if args.eager:
        variants["eager"] = RunnerOptions(cuda_graphs=False, compile=False, batch_sizes=(1, 2))
    timings: dict[str, dict[str, Any]] = {}
    runner = None
    for name, opts in variants.items():
        runner = None
        torch.cuda.empty_cache()
        torch._dynamo.reset()  # each variant compiles afresh with its own inductor settings
        t0 = time.perf_counter()
        runner = DecodeRunner(model, cache, opts)
        reset_lanes(runner, slots[:1], 300, model)
        runner.step()
        runner.sync()
        setup = time.perf_counter() - t0
        row: dict[str, Any] = {"setup_s": setup, "attention": runner.attention_name}
        for bs in (1, 2):
            reset_lanes(runner, slots[:bs], 300, model)
            row[f"ms_b{bs}"] = 1e3 * time_steps(runner, args.steps)
        runner.clear()
        timings[name] = row
        log(f"{name}: {row} attention={runner.attention_name} compiled={runner.compiled}")
    result["step_variants"] = timings
    probe = DecodeRunner(model, cache, RunnerOptions(cuda_graphs=True, compile=False))
    result["gemv_only_ms_b1"] = gemv_only_ms(probe, 1)
    result["gemv_only_ms_b2"] = gemv_only_ms(probe, 2)
    log(
        f"matrix products alone: b1 {result['gemv_only_ms_b1']:.2f} ms, "
        f"b2 {result['gemv_only_ms_b2']:.2f} ms"
    )
    if args.profile:
        reset_lanes(probe, slots[:1], 300, model)
        for name, ms, count in kernel_breakdown(probe):
            log(f"  {ms:7.3f} ms x{count:4d}  {name}")
        probe.clear()
    best = min(timings, key=lambda k: timings[k]["ms_b1"])
    result["step_variant"] = best
    result["attention"] = timings[best]["attention"]
    result["split_reductions"] = variants[best].split_reductions
    result["ms_per_token_b1"] = timings[best]["ms_b1"]
    result["ms_per_token_b2"] = timings[best]["ms_b2"]
    torch._dynamo.reset()
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
    # the same eager step with the prompt pre-filled in two pieces: how far bf16 rounding
    # alone moves a 64-layer random network (random weights amplify it layer after layer)
    eager2 = _greedy_run(eager, slots[0], model, split=True)
    same2 = sum(a == b for a, b in zip(eager2, eager_toks, strict=True))
    result["full_size_greedy_agreement_eager_vs_eager_split_prefill"] = f"{same2}/{len(eager2)}"
    log(
        f"full-size greedy agreement fast vs eager: {same}/{len(fast_toks)}; "
        f"eager vs eager with a split pre-fill: {same2}/{len(eager2)}"
    )
    return {"model": full, "runner_opts": variants[best]}


def _greedy_run(
    runner: DecodeRunner, slot: int, model: Qwen2ForCausalLM, split: bool = False
) -> list[int]:
    prompt = torch.arange(16, device=runner.device) * 37
    if split:
        runner.prefill(model.embed(prompt[:7]), slot, 0)
        logits = runner.prefill(model.embed(prompt[7:]), slot, 7)
    else:
        logits = runner.prefill(model.embed(prompt), slot, 0)
    runner.clear()
    runner.add_lane(slot, 16, LaneSampling(), logits=logits)
    out = [t[0] for t in (runner.step() for _ in range(12))]
    runner.clear()
    return out


CANNED = "The capital of France is Paris, which sits on the river Seine in the north."
WORDS_PER_TOKEN = 0.75


def synthetic_speech(seconds: float, seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    voiced = 0.25 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) * (0.6 + 0.4 * np.sin(9 * t) ** 2)
    return (voiced + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def load_tts_head(result: dict[str, Any]) -> Any:
    try:
        from realtime.config import TTSConfig
        from tts import load_tts

        head = load_tts(TTSConfig(), output_rate=24000)
        head.warmup()
        result["tts"] = getattr(head, "name", type(head).__name__)
        return head
    except Exception as exc:  # noqa: BLE001 - reported, then measured without TTS
        result["tts"] = f"unavailable: {exc}"
        log(f"TTS unavailable: {exc}")
        return None


def bench_turns(args: argparse.Namespace, model: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Turns with end-of-speech detection simulated: speculative respond after
    ``--pause-ms`` of silence, audio released at ``--eos-ms`` (the endpoint)."""
    import asyncio

    from realtime.config import EngineConfig, SamplingConfig
    from realtime.engine.step_audio import StepAudioEngine, StepAudioOptions, encoding_error
    from realtime.models.step_audio.random_tokenizer import random_tokenizer
    from realtime.models.step_audio.tokens import SpecialTokens

    tok = random_tokenizer()
    special = SpecialTokens.from_tokenizer(tok)
    model.audio_patch_id = special.audio_patch
    cfg = EngineConfig(
        backend="step-audio-random", device="cuda", max_context=args.max_len, max_batch=2
    )
    t0 = time.perf_counter()
    opts = StepAudioOptions(split_reductions=result.get("split_reductions", True))
    torch._dynamo.reset()
    engine = StepAudioEngine(model, tok, special, cfg, opts, name="step-audio-random")
    engine.warmup()
    result["engine_warmup_s"] = time.perf_counter() - t0
    result["engine_attention"] = engine.runner.attention_name
    log(
        f"engine warm-up {result['engine_warmup_s']:.1f}s (attention: {engine.runner.attention_name}"
        f", compiled step: {engine.runner.compiled})"
    )
    speech10 = synthetic_speech(10.0, 1)
    result["encoding_error_640ms"] = {
        f"lookahead_{la}": encoding_error(model, speech10, engine.chunk_samples, la)
        for la in (0, 2, 4)
    }
    log(f"chunked vs whole encoding (10 s, random encoder): {result['encoding_error_640ms']}")
    # one 640 ms chunk of listening (growing-window encode + pre-fill) at 3 s and 10 s
    sess = engine.new_session(cfg.system_prompt, SamplingConfig())
    listen_ms = {}
    for upto in (3.0, 10.0):
        sess.discard()
        n = int(upto * 16000)
        sess.listen(speech10[: n - engine.chunk_samples])
        engine.between_jobs()  # its pieces' pre-fill pass, as the engine worker runs it
        engine.runner.sync()
        a = time.perf_counter()
        sess.listen(speech10[n - engine.chunk_samples : n])
        engine.between_jobs()
        engine.runner.sync()
        listen_ms[f"{upto:.0f}s"] = 1e3 * (time.perf_counter() - a)
    sess.close()
    result["listen_640ms_chunk_ms"] = listen_ms
    log(f"listen one 640 ms chunk: {listen_ms}")

    head = load_tts_head(result)
    tts_first: list[float] = []
    if head is None or "espeak" in str(result.get("tts", "")).lower():
        log("TTS missing: first-packet figures add no synthesis time")
    pause, eos = args.pause_ms / 1e3, args.eos_ms / 1e3
    out: dict[str, Any] = {}
    for budget in (0, 64, 256):
        sampling = SamplingConfig(think_budget=budget, max_new_tokens=64)
        session = engine.new_session(cfg.system_prompt, sampling)
        rows = []
        for i in range(args.turns):
            rows.append(
                asyncio.run(_one_turn(engine, session, head, budget, 2.0 + (i % 5) * 0.6, i, pause))
            )
            if rows[-1]["tts_first_chunk_s"] is not None:
                tts_first.append(rows[-1]["tts_first_chunk_s"])
        session.close()
        first_ans = [r["first_answer_s"] for r in rows]
        ready = [r["audio_ready_s"] for r in rows]
        packet = [max(eos, r) for r in ready]
        no_spec = [eos - pause + r for r in ready]
        steps = [r["ms_per_step_speaking"] for r in rows if r["ms_per_step_speaking"]]
        out[str(budget)] = {
            "turns": len(rows),
            "first_answer_p50": statistics.median(first_ans),
            "first_packet_p50": statistics.median(packet),
            "first_packet_p90": sorted(packet)[int(0.9 * (len(packet) - 1))],
            "first_packet_no_speculation_p50": statistics.median(no_spec),
            "audio_ready_p50": statistics.median(ready),
            "ms_per_step_speaking_p50": statistics.median(steps) if steps else None,
            "thinking_tokens_by_first_packet_p50": statistics.median(
                r["thinking_tokens_at_packet"] for r in rows
            ),
            "lanes": 1 if budget == 0 else 2,
        }
        log(f"budget {budget}: {out[str(budget)]}")
    result["eos_detection_ms"] = args.eos_ms
    result["speculative_after_ms"] = args.pause_ms
    result["tts_first_chunk_p50_s"] = statistics.median(tts_first) if tts_first else None
    result["canned_answer_text"] = CANNED
    return out


async def _one_turn(
    engine: Any, session: Any, head: Any, budget: int, seconds: float, seed: int, pause: float
) -> dict[str, Any]:
    """One turn. Times are seconds after the true end of speech."""
    import asyncio
    import threading

    import numpy as np

    from realtime.engine.base import CancelToken, UserTurn

    speech = synthetic_speech(seconds, seed)
    silence = np.zeros(int(pause * 16000), dtype=np.float32)
    piece = 2560  # 160 ms, as audio arrives
    for i in range(0, speech.shape[0], piece):
        session.listen(speech[i : i + piece])
        engine.between_jobs()  # as the engine worker does after each job: the pieces' pass
    engine.runner.sync()
    words = CANNED.split()
    st: dict[str, Any] = {"answer": 0, "pushed": 0, "first_answer": None, "think": 0}
    times: list[float] = []
    stream = head.open_stream() if head is not None else None
    got_audio = threading.Event()
    cancel = CancelToken()
    t_start = time.monotonic()  # = end of speech + pause (the pause detection)

    def on_token(role: str, tok: int, t: float) -> None:
        if role != "articulation":
            st["think"] += 1
            return
        st["answer"] += 1
        times.append(t)
        if st["first_answer"] is None:
            st["first_answer"] = t
        target = min(len(words), int(st["answer"] * WORDS_PER_TOKEN))
        while stream is not None and st["pushed"] < target:
            stream.push_text((" " if st["pushed"] else "") + words[st["pushed"]])
            st["pushed"] += 1
        if st["answer"] >= 24 and (got_audio.is_set() or stream is None):
            cancel.cancel()

    session.on_token = on_token
    audio = np.concatenate([speech, silence])

    def run() -> None:
        session.listen(silence)
        session.listen(audio[session._l.audio.shape[0] :])  # the rest of the turn
        engine.between_jobs()
        try:
            for _ in session.respond(UserTurn(), cancel):
                pass
        finally:
            if stream is not None:
                stream.finish()  # lets chunks() end even if no piece was complete

    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, run)
    first_chunk = None
    think_at_packet = 0
    if stream is not None:

        async def first() -> None:
            nonlocal first_chunk, think_at_packet
            async for _chunk in stream.chunks():
                first_chunk = time.monotonic()
                think_at_packet = st["think"]
                got_audio.set()
                break

        await asyncio.wait_for(first(), timeout=60)
        stream.cancel()
    await fut
    session.commit(UserTurn(), "The capital of France", interrupted=True)
    first_answer = st["first_answer"] or time.monotonic()
    ready = first_chunk if first_chunk is not None else first_answer
    gaps = [b - a for a, b in zip(times[4:], times[5:], strict=False)]
    return {
        "first_answer_s": pause + first_answer - t_start,
        "audio_ready_s": pause + ready - t_start,
        "tts_first_chunk_s": None if first_chunk is None else first_chunk - first_answer,
        "ms_per_step_speaking": 1e3 * statistics.median(gaps) if gaps else None,
        "thinking_tokens_at_packet": think_at_packet,
    }


def check_agreement(result: dict[str, Any]) -> None:
    """Is a fast/eager disagreement a bug or the random network's chaos? Compare the fast
    pre-fill with the eager one, and the eager one with itself on inputs perturbed by
    bf16-rounding-sized noise."""
    dev = torch.device("cuda")
    model = random_step_audio(device=dev, dtype=torch.bfloat16).decoder
    cache = KVCache(model.cfg, 2, 1024, dev, torch.bfloat16)
    eager = DecodeRunner(model, cache, RunnerOptions(cuda_graphs=False, compile=False))
    fast = DecodeRunner(model, cache, RunnerOptions())
    torch.manual_seed(0)
    emb = model.embed(torch.randint(0, 150000, (16,), device=dev))
    noisy = emb * (1 + 2**-9 * torch.randn_like(emb.float())).to(emb.dtype)
    ref = eager.prefill(emb, 0, 0)
    out: dict[str, Any] = {}
    for name, runner, x in (("fast", fast, emb), ("eager_perturbed_input", eager, noisy)):
        got = runner.prefill(x, 0, 0)
        top_ref = set(ref.topk(5).indices.tolist())
        out[name] = {
            "logits_rel_l2": float((got - ref).norm() / ref.norm()),
            "argmax_equal": bool(got.argmax() == ref.argmax()),
            "top5_overlap": len(top_ref & set(got.topk(5).indices.tolist())),
        }
    result["agreement_check"] = out
    log(f"agreement check (16-token pre-fill logits vs eager): {out}")


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
    ap.add_argument("--part", choices=["decode", "all", "check"], default="all")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="also time the eager step")
    ap.add_argument("--eos-ms", type=float, default=400.0, help="end-of-speech detection delay")
    ap.add_argument(
        "--pause-ms", type=float, default=120.0, help="pause that starts a speculative answer"
    )
    ap.add_argument("--profile", action="store_true", help="print the step's top kernels")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu-engine.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
    }
    if args.part == "check":
        check_agreement(result)
        print(json.dumps(result, indent=2, default=str))
        return
    state = bench_decode(args, result)
    if args.part == "all":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        result["turns"] = bench_turns(args, state["model"], result)
        result["first_packet_s"] = {
            k: {"p50": v["first_packet_p50"]} for k, v in result["turns"].items()
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


if __name__ == "__main__":
    main()
