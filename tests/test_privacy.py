"""Privacy: a spoken turn through the server leaves no trace of what was said on disk, and the
logs (every logger of the process, at DEBUG) carry session ids, never the user's words, the
answer, the API key or a client secret."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from server_helpers import speech, start_server

from realtime import log_context
from realtime.config import ServerConfig

pytestmark = pytest.mark.asyncio

KEY = "sk-test-privacy-4f1c9e"
QUESTION = "Where does the purple giraffe live in Madrid?"
SECRET_WORDS = ("purple", "giraffe", "madrid")
CALLER = "caller-555-0199"
CLIENT_LOGGERS = ("websockets", "openai", "httpx", "asyncio")  # the test's own client side


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_a_spoken_turn_leaves_no_words_in_logs_or_on_disk(
    runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for d in (home, cwd, tmp):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    caplog.set_level(logging.DEBUG)  # the root logger: every logger of the process
    log_context.install([caplog.handler])  # as run_agent.py does: %(session)s on each line

    server = await start_server(runtime, ServerConfig(api_keys=[KEY]))
    auth = {"Authorization": f"Bearer {KEY}"}
    transcript, answer = "", ""
    try:
        url = f"{server.ws}/v1/realtime?model=local&caller={CALLER}"  # data in the query
        async with websockets.connect(url, additional_headers=auth) as ws:
            created = json.loads(await ws.recv())
            assert created["type"] == "session.created"
            pcm = np.concatenate([speech(QUESTION, 24000), np.zeros(24000, np.int16)])
            for i in range(0, len(pcm), 4800):
                piece = base64.b64encode(pcm[i : i + 4800].tobytes()).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
            async with asyncio.timeout(120):
                while True:
                    event = json.loads(await ws.recv())
                    kind = event["type"]
                    if kind == "conversation.item.input_audio_transcription.completed":
                        transcript = event["transcript"]
                    elif kind == "response.output_audio_transcript.done":
                        answer = event["transcript"]
                    elif kind == "response.done":
                        break
        await asyncio.sleep(0.3)  # the server closes the session
    finally:
        await server.runner.cleanup()

    heard = [w for w in SECRET_WORDS if w in transcript.lower()]
    assert heard, f"the recogniser should have heard the question: {transcript!r}"
    assert len(answer.strip()) > 10, answer
    server_records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    logs = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in server_records
    ).lower()
    # the logs name the session by the id its client was given: the server's lines and the
    # pipeline's own (its tasks inherit the id)
    sid = created["session"]["id"]
    assert f"realtime session {sid} opened".lower() in logs
    tagged = {r.name for r in server_records if getattr(r, "session", "-") == sid}
    assert "realtime.controller" in tagged, tagged
    for word in heard:
        assert word not in logs, f"the user's word {word!r} is in the logs"
    assert transcript.lower().strip() not in logs
    assert answer.lower().strip() not in logs
    assert KEY.lower() not in logs
    assert "/v1/realtime" in logs and CALLER not in logs  # the access log, without the query
    assert not files_under(home) and not files_under(cwd) and not files_under(tmp), files_under(
        tmp_path
    )
