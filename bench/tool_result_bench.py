"""Does the answer after a tool's output come from that output? ``engine.backend:
openai-compatible`` against a running OpenAI-compatible server.

Each case is a question, the tool the model is made to call (a named ``tool_choice``), the
output the tool returns and the values of that output a listener should hear (none of them in
the question). Per case, through the engine (engine-only: no audio, no TTS):

1. the question with the tool named: the call (scored: a call of that tool came, its
   arguments a JSON object; the output goes back either way);
2. the call's output goes back (``role: tool``, or a user message with ``--tool-results
   as_user_text``) with ``tool_choice: none``: the answer, scored ``uses_result`` when it
   contains one of the values (case-insensitive), and ``verbatim`` when it reads the output's
   JSON or "result of" aloud instead of saying it in words;
3. control: the same question in a fresh session without tools or output; ``control_has``
   when its answer contains one of the values anyway (the model's own guess).

    python -m llama_cpp.server --model <SmolLM2 GGUF> --model_alias smollm2 --port 8011 \\
        [--chat_format chatml-function-calling]
    python bench/tool_result_bench.py --base-url http://127.0.0.1:8011/v1 --model smollm2 \\
        --label smollm2-gguf-template [--tool-results native|as_user_text]
    (writes bench/results/tool-results-LABEL.json, or --out)
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
from realtime.engine.openai_compat import OpenAICompatEngine
from realtime.engine.tools import ToolCallError, ToolResult, ToolSpec, parse_tool_calls


def _tool(name: str, description: str, **props: str) -> ToolSpec:
    properties = {k: {"type": t} for k, t in props.items()}
    return ToolSpec(
        name, description, {"type": "object", "properties": properties, "required": list(props)}
    )


WEATHER = _tool("get_weather", "Get the current weather in a city.", city="string")
CURRENCY = _tool(
    "convert_currency", "Convert money.", amount="number", from_currency="string", to_currency="string"
)  # fmt: skip
ORDER = _tool("get_order_status", "Where an order is.", order_id="string")
FLIGHT = _tool("get_flight", "A flight's departure time and gate.", flight="string")
STOCK = _tool("get_stock_price", "The last price of a share.", symbol="string")
BOOKING = _tool("book_table", "Book a restaurant table.", restaurant="string", people="integer")
HOURS = _tool("get_opening_hours", "When a shop is open today.", shop="string")

# (question, tool, the tool's output, values of the output a listener should hear)
CASES: list[tuple[str, ToolSpec, str, tuple[str, ...]]] = [
    ("What is the weather like in Paris?", WEATHER,
     '{"city": "Paris", "temp_c": 31, "sky": "thunderstorms"}', ("31", "thunderstorm")),
    ("What is the weather like in Oslo?", WEATHER,
     '{"city": "Oslo", "temp_c": -7, "sky": "heavy snow"}', ("-7", "minus seven", "snow")),
    ("Is it sunny in Lima today?", WEATHER,
     '{"city": "Lima", "temp_c": 24, "sky": "fog"}', ("24", "fog")),
    ("How much is 100 US dollars in euros?", CURRENCY,
     '{"amount": 100, "from": "USD", "to": "EUR", "result": 86.42}', ("86",)),
    ("Where is my order 5521?", ORDER,
     '{"order_id": "5521", "status": "shipped", "carrier": "DHL", "arrives": "Thursday"}',
     ("dhl", "thursday", "shipped")),
    ("When does flight BA117 leave?", FLIGHT,
     '{"flight": "BA117", "departs": "18:40", "gate": "B32"}', ("18:40", "b32", "6:40")),
    ("What is the price of ACME stock?", STOCK,
     '{"symbol": "ACME", "price_usd": 412.17}', ("412",)),
    ("Book a table for two at Luigi's tonight.", BOOKING,
     '{"confirmed": true, "time": "20:15", "table": 12}', ("20:15", "8:15", "12")),
    ("Is the bakery open today?", HOURS,
     '{"shop": "bakery", "open": "07:30", "close": "13:00"}', ("7:30", "13:00", "1 pm", "1:00")),
    ("What is the weather like in Rome?", WEATHER,
     "Hail and 9 degrees Celsius.", ("hail", "9")),
]  # fmt: skip


@dataclass
class Result:
    question: str
    tool: str
    called: bool
    arguments: str | None
    output: str
    answer: str
    uses_result: bool
    verbatim: bool
    control: str
    control_has: bool
    seconds: float


def _answer(session: Any, turn: UserTurn) -> tuple[str, list[str]]:
    text, calls = "", []
    for ev in session.respond(turn, CancelToken()):
        if ev is None:
            continue
        if ev.kind == "answer":
            text += ev.text
        elif ev.kind == "tool_call":
            calls.append(ev.text)
    return text.strip(), calls


def _has(text: str, values: tuple[str, ...]) -> bool:
    return any(v.lower() in text.lower() for v in values)


def run_case(engine: OpenAICompatEngine, case: tuple) -> Result:
    question, tool, output, values = case
    cfg = engine.cfg
    t0 = time.monotonic()
    session = engine.new_session(cfg.system_prompt, cfg.sampling)
    session.set_tools((tool,), tool.name)
    ask = UserTurn(text=question)
    _, calls = _answer(session, ask)
    session.commit(ask, "", interrupted=False)
    try:
        call = parse_tool_calls(calls[0])[0] if calls else None
    except ToolCallError:  # e.g. arguments cut off at max_new_tokens: the output goes back anyway
        call = None
    session.set_tools((tool,), "none")
    back = UserTurn(text="", tool_results=(ToolResult("call_bench", tool.name, output),))
    answer, _ = _answer(session, back)
    session.close()
    plain = engine.new_session(cfg.system_prompt, cfg.sampling)
    control, _ = _answer(plain, UserTurn(text=question))
    plain.close()
    raw = calls[0] if calls else None  # a call that did not parse is kept as it came
    verbatim = "{" in answer or "result of" in answer.lower()
    return Result(
        question, tool.name, call is not None and call.name == tool.name,
        call.arguments if call else raw, output, answer, _has(answer, values), verbatim,
        control, _has(control, values), round(time.monotonic() - t0, 2),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="the server's /v1 URL")
    ap.add_argument("--model", default="", help="the served model (empty: the first listed)")
    ap.add_argument("--label", default="server", help="names the run (e.g. its chat format)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument(
        "--tool-results", choices=["native", "as_user_text"], default="native",
        help="engine.remote.tool_results: how the output goes back",
    )  # fmt: skip
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    sets = {
        "engine.backend": "openai-compatible",
        "engine.model": a.model,
        "engine.remote": {
            "base_url": a.base_url,
            "read_timeout_s": 120.0,
            "tool_results": a.tool_results,
        },
        "engine.sampling.max_new_tokens": a.max_new_tokens,
    }
    cfg = load_config("embedded", sets)
    engine = OpenAICompatEngine(cfg.engine)
    out = Path(a.out or f"bench/results/tool-results-{a.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    try:
        for case in CASES:
            r = run_case(engine, case)
            results.append(r)
            print(
                f"called={int(r.called)} uses={int(r.uses_result)} verbatim={int(r.verbatim)} "
                f"control={int(r.control_has)} "
                f"{r.seconds:5.1f}s {r.question[:36]:36s} {r.answer[:90]!r}",
                flush=True,
            )
    finally:
        engine.close()
    n = len(results)
    summary = {
        "cases": n,
        "called": sum(r.called for r in results),
        "uses_result": sum(r.uses_result for r in results),
        "verbatim": sum(r.verbatim for r in results),
        "control_has": sum(r.control_has for r in results),
    }
    print(
        "\n| server | tool_results | cases | named call made | answer says a value of the output "
        "| of which reads JSON or 'result of' aloud | control (no output) says a value |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {a.label} | {a.tool_results} | {n} | {summary['called']}/{n} | "
        f"{summary['uses_result']}/{n} | {summary['verbatim']}/{n} | {summary['control_has']}/{n} |"
    )
    record = {
        "label": a.label,
        "base_url": a.base_url,
        "model": engine.model,
        "tool_results": a.tool_results,
        "sampling": asdict(cfg.engine.sampling),
        "system_prompt": cfg.engine.system_prompt,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "summary": summary,
        "results": [asdict(r) for r in results],
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
