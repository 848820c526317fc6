"""Streaming TTS benchmark: first-chunk latency, real-time factor and playback gaps.

    python bench/tts_bench.py [--repeats 5] [--token-ms 30] [--threads N] [--gpu]

Answer text is pushed token by token (about 30 ms a token, faster than speech) from a
thread, as the engine does; the event loop collects the chunks. For each run:

* ``first_chunk_ms``: from the push of the token that completes the first piece's text (the
  first clause, or the first words when no punctuation comes) to the first audio chunk. The
  segmenter may need one more token to confirm the cut (after "Paris." or "France"), so this
  includes that wait (the stream synthesises its guess meanwhile);
* ``real_time_factor``: synthesis time / audio duration;
* ``max_gap_ms``: a consumer playing at real time from the first chunk on starves this long,
  at most, waiting for the next chunk.

Medians over runs are reported (the machine is shared; the load average is recorded).
Writes ``bench/results/tts-cpu.json`` (``tts-gpu.json`` with ``--gpu``) and prints a table last.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from realtime.config import TTSConfig
from tts.piper_backend import PiperHead
from tts.segmenter import Segmenter
from tts.stream import TextStream

RESULTS = Path(__file__).resolve().parent / "results"

ANSWERS = {
    "comma": (
        "Sure, here is a quick overview. Paris is the capital of France, with about 2.1 million "
        "people in the city itself and more than 12 million in the wider region. It sits on the "
        "Seine, in the north of the country. The city is famous for the Eiffel Tower, which was "
        "built in 1889 for the World's Fair, and for the Louvre, the most visited museum in the "
        "world. Paris is also known for its cafes, its fashion houses and its food. If you go, "
        "spring and early autumn are the best times, when the weather is mild and the crowds are "
        "smaller."
    ),
    "sentence": (
        "The capital of France is Paris. It has been the country's political and cultural centre "
        "for more than a thousand years, and today it is one of the most visited cities on earth. "
        "A ticket for the metro costs about $2.50, and most museums are free on the first Sunday "
        "of the month. The best way to see the city is on foot, walking along the river from "
        "Notre Dame to the Eiffel Tower, which takes about an hour and a half."
    ),
    "words": (
        "I think the best way to learn a new language is to practise a little every day rather "
        "than a lot once a week. Start with the two or three hundred most common words, because "
        "they cover most of what people say. Listen to podcasts or watch shows with subtitles, "
        "and try to speak from the very first week, even if you make mistakes. After about three "
        "months of steady work, most people can hold a simple conversation."
    ),
}

TOKEN_RE = re.compile(r"\s?[A-Za-z']+|\s?\d|\s?[^\sA-Za-z\d]")


def tokenize(text: str) -> list[str]:
    """LLM-like tokens: a word with its leading space, digits and marks one by one."""
    tokens = TOKEN_RE.findall(text)
    assert "".join(tokens) == text
    return tokens


def first_piece_tokens(tokens: list[str], head: PiperHead) -> tuple[int, int]:
    """(index of the token that completes the first piece's text, index of the token whose
    push lets the segmenter release it: the same, or the next one when it needs a lookahead)."""
    seg = Segmenter(head.segmenter)
    for i, tok in enumerate(tokens):
        pieces = seg.push(tok)
        if pieces:
            end, length = 0, 0
            while length < len(pieces[0]):
                length += len(tokens[end])
                end += 1
            return end - 1, i
    return len(tokens) - 1, len(tokens) - 1


@dataclass
class Run:
    answer: str
    first_chunk_ms: float
    first_chunk_after_release_ms: float
    first_audio_after_first_token_ms: float
    speculation_used: bool
    real_time_factor: float
    max_gap_ms: float
    audio_s: float
    pieces: int


def feed(stream: TextStream, tokens: list[str], token_s: float, pushed: list[float]) -> None:
    start = time.monotonic()
    for i, tok in enumerate(tokens):
        delay = start + i * token_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pushed.append(time.monotonic())
        stream.push_text(tok)
    stream.finish()


def playback_gaps(arrivals: list[tuple[float, float]]) -> list[float]:
    """Starvation of a real-time player: (arrival, duration) per chunk -> gaps in seconds."""
    gaps = []
    play_end = arrivals[0][0] + arrivals[0][1]
    for arrival, duration in arrivals[1:]:
        gaps.append(max(0.0, arrival - play_end))
        play_end = max(arrival, play_end) + duration
    return gaps


async def one_run(head: PiperHead, name: str, text: str, token_s: float) -> Run:
    tokens = tokenize(text)
    first_end, first_release = first_piece_tokens(tokens, head)
    stream = head.open_stream()
    pushed: list[float] = []
    arrivals: list[tuple[float, float]] = []
    feeder = threading.Thread(target=feed, args=(stream, tokens, token_s, pushed), daemon=True)
    feeder.start()
    async for chunk in stream.chunks():
        arrivals.append((time.monotonic(), chunk.pcm.size / chunk.sample_rate))
    feeder.join()
    gaps = playback_gaps(arrivals)
    return Run(
        answer=name,
        first_chunk_ms=1000 * (arrivals[0][0] - pushed[first_end]),
        first_chunk_after_release_ms=1000 * (arrivals[0][0] - pushed[first_release]),
        first_audio_after_first_token_ms=1000 * (arrivals[0][0] - pushed[0]),
        speculation_used=stream.stats.speculation_used,
        real_time_factor=stream.stats.real_time_factor,
        max_gap_ms=1000 * max(gaps, default=0.0),
        audio_s=sum(d for _, d in arrivals),
        pieces=len(stream.stats.pieces),
    )


def _burn() -> None:
    while True:  # a stand-in for the LLM decoding on another core
        pass


def machine(gpu: bool) -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    if gpu:
        try:
            info["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
        except OSError:
            info["gpu"] = "unknown (no nvidia-smi)"
    return info


def command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


async def main_async(args: argparse.Namespace) -> int:
    cfg = TTSConfig(voice=args.voice, use_gpu=args.gpu)
    load_start = time.perf_counter()
    head = PiperHead(cfg, threads=args.threads or None, spin=args.spin)
    head.warmup()
    load_s = time.perf_counter() - load_start
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.busy)]
    for p in burners:
        p.start()
    load_before = os.getloadavg()
    runs: list[Run] = []
    for repeat in range(args.repeats):
        for name, text in ANSWERS.items():
            runs.append(await one_run(head, name, text, args.token_ms / 1000))
            print(
                f"run {repeat + 1} {name:8s} first {runs[-1].first_chunk_ms:6.1f} ms  "
                f"gap {runs[-1].max_gap_ms:6.1f} ms  rtf {runs[-1].real_time_factor:.3f}",
                file=sys.stderr,
            )
            await asyncio.sleep(0.2)
    load_after = os.getloadavg()
    for p in burners:
        p.terminate()
    result = {
        "first_chunk_ms": median([r.first_chunk_ms for r in runs]),
        "real_time_factor": round(statistics.median([r.real_time_factor for r in runs]), 4),
        "max_gap_ms": median([r.max_gap_ms for r in runs]),
        "first_chunk_ms_max": round(max(r.first_chunk_ms for r in runs), 2),
        "max_gap_ms_max": round(max(r.max_gap_ms for r in runs), 2),
        "by_answer": {
            name: {
                "first_chunk_ms": median([r.first_chunk_ms for r in runs if r.answer == name]),
                "max_gap_ms": median([r.max_gap_ms for r in runs if r.answer == name]),
            }
            for name in ANSWERS
        },
        "runs": len(runs),
        "repeats": args.repeats,
        "token_ms": args.token_ms,
        "busy_processes": args.busy,
        "provider": head.provider,
        "threads": head.threads,
        "load_s": round(load_s, 2),
        "load_avg_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "targets": {"first_chunk_ms": 80, "max_gap_ms": 40},
        "machine": machine(args.gpu),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command(),
        "all_runs": [asdict(r) for r in runs],
    }
    out = Path(args.out) if args.out else RESULTS / ("tts-gpu.json" if args.gpu else "tts-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    rows = [
        (
            "first chunk after first piece's text (median)",
            f"{result['first_chunk_ms']:.1f} ms",
            "<= 80 ms",
        ),
        ("first chunk, worst run", f"{result['first_chunk_ms_max']:.1f} ms", ""),
        ("max playback gap (median of runs)", f"{result['max_gap_ms']:.1f} ms", "<= 40 ms"),
        ("max playback gap, worst run", f"{result['max_gap_ms_max']:.1f} ms", ""),
        ("real-time factor (median)", f"{result['real_time_factor']:.3f}", "< 1"),
    ]
    for name, values in result["by_answer"].items():  # type: ignore[union-attr]
        rows.append(
            (
                f"  answer '{name}': first chunk / max gap",
                f"{values['first_chunk_ms']:.1f} / {values['max_gap_ms']:.1f} ms",
                "",
            )
        )
    print(
        f"\nStreaming TTS: Piper {args.voice}, {head.provider}, {head.threads} threads, "
        f"{len(runs)} runs, tokens every {args.token_ms} ms, {args.busy} busy processes, "
        f"load {load_before[0]:.2f} -> {load_after[0]:.2f}; wrote {out}"
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'metric':{width}s} | {'value':>16s} | target   |")
    print(f"|{'-' * (width + 2)}|{'-' * 18}|----------|")
    for label, value, target in rows:
        print(f"| {label:{width}s} | {value:>16s} | {target:8s} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each answer")
    parser.add_argument("--token-ms", type=float, default=30.0, help="time between tokens")
    parser.add_argument("--voice", default="joe")
    parser.add_argument("--gpu", action="store_true", help="onnxruntime CUDA provider if present")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    parser.add_argument("--spin", action="store_true", help="let onnxruntime threads spin")
    parser.add_argument("--busy", type=int, default=0, help="CPU-burning processes alongside")
    parser.add_argument("--out", default="", help="result file (default bench/results/tts-*.json)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
