"""SIGTERM drains: ``run_agent.py --serve`` as a real process, a client in the middle of a
turn; the signal gets the client a closing event after its answer, a close, and the process
exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets

pytestmark = pytest.mark.asyncio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


async def wait_serving(proc: subprocess.Popen[str], timeout: float = 240) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.startswith("Serving on"):
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
    raise AssertionError("the server did not start")


async def test_sigterm_drains_live_sessions_and_exits_0(tmp_path: Path) -> None:
    # the default stack without speech recognition (the client types): it starts faster
    config = tmp_path / "light.yaml"
    base = (Path(__file__).resolve().parent.parent / "configs" / "embedded.yaml").read_text()
    config.write_text(base.replace("asr:\n  backend: faster-whisper", "asr:\n  backend: none"))
    # a short answer, and time enough for it on a busy 2-core machine
    light = config.read_text().replace("shutdown_drain_s: 10", "shutdown_drain_s: 90")
    config.write_text(light.replace("max_new_tokens: 96", "max_new_tokens: 12"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "run_agent.py", "--serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await wait_serving(proc)
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            metrics = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
            assert 'agent_sessions_active{transport="realtime"} 1.0' in metrics
            assert 'agent_engine{stat="sessions"} 1.0' in metrics  # the engine's own count
            text = {"type": "input_text", "text": "Name a colour."}
            item = {"type": "message", "role": "user", "content": [text]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await ws.send(json.dumps({"type": "response.create"}))
            while json.loads(await ws.recv())["type"] != "response.created":
                pass
            proc.send_signal(signal.SIGTERM)  # an answer in flight
            events: list[dict[str, Any]] = []
            try:
                async with asyncio.timeout(120):
                    while True:
                        events.append(json.loads(await ws.recv()))
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
        assert code == 1001, [e["type"] for e in events]
        errors = [e["error"] for e in events if e["type"] == "error"]
        assert [e["code"] for e in errors] == ["server_shutting_down"], errors
        done = [e["response"]["status"] for e in events if e["type"] == "response.done"]
        assert done == ["completed"], [e["type"] for e in events]  # the answer had its time
        out, err = await asyncio.to_thread(proc.communicate, timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "Stopped" in out, out
        assert "Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
