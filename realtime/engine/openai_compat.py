"""``engine.backend: openai-compatible``: the reply comes from any OpenAI-compatible LLM server
(vLLM, SGLang, llama.cpp's server, Ollama, a hosted API) instead of a model in this process.

Each answer is one ``POST {base_url}/chat/completions`` with ``stream: true``; the server-sent
events come back as the engine's thinking and answer tokens. Reasoning is taken from the
``reasoning_content`` delta field where the server sends it (vLLM and SGLang with a reasoning
parser), else from ``<think>...</think>`` in the content.

Tools: declared tools go in the request as ``tools`` (the Chat Completions form) with
``tool_choice``; the streamed ``delta.tool_calls[i]`` pieces (id, name, argument fragments) are
put together per index and, when the choice finishes or the stream ends, come out as one
``tool_call`` event each, ``{"name": ..., "arguments": "<json text>"}``, which the responder
checks and gives a call id of its own. The history keeps the assistant's ``tool_calls`` (with
the server's ids), and the client's outputs go back as ``role: "tool"`` messages whose
``tool_call_id`` is the id of the call they answer (matched by tool name, in call order).
For a server whose chat template drops tool messages (llama-cpp-python's
chatml-function-calling), ``engine.remote.tool_results: as_user_text`` sends the outputs as
one user message, ``Result of NAME: OUTPUT`` a line.
A server that answers a request with tools with an empty stream (llama-cpp-python's
chatml-function-calling cannot stream ``auto`` or ``required``) is asked again without
streaming, and for that tool choice unstreamed from then on.

Threads: the HTTP requests run on one event loop of the engine's own (a background thread with
one aiohttp client session and its pool of kept-alive connections), never on the caller's loop
and never blocking the engine's worker thread. ``respond`` (on the worker thread) reads what the
request received and yields ``None`` while nothing has come, so that the worker can advance other
sessions' answers meanwhile. Cancelling an answer (barge-in, ``response.cancel``, a discarded
speculative answer) cancels its request, which closes the connection: the server sees the
client go away and stops generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from realtime.config import EngineConfig, RemoteLLMConfig, SamplingConfig
from realtime.engine.base import CancelToken, TokenEvent, TurnStats, UserTurn
from realtime.engine.parser import ReasoningParser
from realtime.engine.tools import AUTO, ToolChoice, ToolSpec, forced_name

log = logging.getLogger(__name__)

WAIT_S = 0.02  # the longest a waiting answer holds the worker before giving way
MAX_ERROR_BODY = 300  # characters of an error answer quoted in the error message


class RemoteEngineError(RuntimeError):
    """The LLM server failed a request: unreachable, too slow, an HTTP error or a bad stream.
    The message says which server and what happened."""


@dataclass(frozen=True, slots=True)
class _Piece:
    kind: str  # "reasoning" | "content" | "tool" | "calls_end" | "usage" | "done" | "error"
    text: str = ""  # for "tool": a fragment of the call's arguments
    usage: dict[str, Any] | None = None
    error: BaseException | None = None
    index: int = 0  # "tool": which call of the answer
    call_id: str = ""  # "tool": the server's id of the call (in the call's first piece)
    name: str = ""  # "tool": the function's name (in the call's first piece)


def _tool_pieces(calls: Any, legacy: Any) -> Iterator[_Piece]:
    """The ``tool`` pieces of one delta (or whole message): ``tool_calls``, else the legacy
    ``function_call`` (one call)."""
    if not isinstance(calls, list):
        calls = [{"index": 0, "function": legacy}] if isinstance(legacy, dict) else []
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        args = fn.get("arguments")
        if isinstance(args, dict):  # some servers send the object itself
            args = json.dumps(args, ensure_ascii=False)
        index = call.get("index")
        yield _Piece(
            "tool",
            text=args if isinstance(args, str) else "",
            index=index if isinstance(index, int) else i,
            call_id=str(call.get("id") or ""),
            name=str(fn.get("name") or ""),
        )


class _HttpLoop:
    """An event loop on its own thread holding one aiohttp session for every request."""

    def __init__(self, cfg: RemoteLLMConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llm-http", daemon=True)
        self._thread.start()
        self.client: aiohttp.ClientSession = self.run(self._open(cfg), timeout=10)

    async def _open(self, cfg: RemoteLLMConfig) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=max(1, cfg.max_connections))
        return aiohttp.ClientSession(connector=connector)

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any, timeout: float) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(self.client.close(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - closing anyway
            log.warning("closing the LLM client failed: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class OpenAICompatEngine:
    name = "openai-compatible"
    input_kind = "text"
    interleaved_responses = True  # every answer is its own request

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        remote = cfg.remote
        if not remote.base_url.startswith(("http://", "https://")):
            raise RemoteEngineError(
                f"engine.remote.base_url must start with http:// or https://, got {remote.base_url!r}"
            )
        self.base_url = remote.base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=remote.connect_timeout_s, sock_read=remote.read_timeout_s
        )
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = remote.api_key or (
            os.environ.get(remote.api_key_env, "") if remote.api_key_env else ""
        )
        if remote.api_key_env and not key:
            raise RemoteEngineError(
                f"engine.remote.api_key_env names {remote.api_key_env}, which is not set"
            )
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        # the tool choices ("auto", "required", "none", "named") for which the server sent
        # an empty stream: requests with them are no longer streamed
        self.unstreamable: set[str] = set()
        # Set by any request that received something: a waiting answer wakes at once.
        self.arrived = threading.Event()
        self.http = _HttpLoop(remote)
        try:
            self.model = cfg.model or self.http.run(
                self._first_model(), timeout=remote.connect_timeout_s + remote.read_timeout_s + 1
            )
        except BaseException:
            self.http.close()
            raise
        log.info("reply engine: %s at %s", self.model, self.base_url)

    async def _first_model(self) -> str:
        """The model the server serves (engine.model left empty)."""
        url = f"{self.base_url}/models"
        try:
            async with self.http.client.get(url, headers=self.headers, timeout=self.timeout) as r:
                if r.status != 200:
                    raise RemoteEngineError(_status_message(url, r.status, await r.text()))
                models = (await r.json(content_type=None)).get("data") or []
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise RemoteEngineError(
                f"cannot list the models of the LLM server at {url} ({_describe(exc)}); "
                "is it running? (or set engine.model)"
            ) from exc
        if not models or "id" not in models[0]:
            raise RemoteEngineError(f"the LLM server at {url} lists no model; set engine.model")
        return str(models[0]["id"])

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> OpenAICompatSession:
        return OpenAICompatSession(self, system_prompt, sampling)

    def warmup(self) -> None:
        """One tiny answer: the server is reachable and serves the model before any caller."""
        s = self.new_session("You are a helpful assistant.", SamplingConfig(max_new_tokens=2))
        for _ in s.respond(UserTurn(text="Hello."), CancelToken()):
            pass
        s.close()

    def close(self) -> None:
        self.http.close()

    # -- one request, on the HTTP loop ------------------------------------------------
    def _failure(self, exc: BaseException) -> str:
        r = self.cfg.remote
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"the LLM server at {self.url} did not accept a connection within {r.connect_timeout_s:g} s"
        if isinstance(exc, TimeoutError):
            return (
                f"the LLM server at {self.url} sent nothing for {r.read_timeout_s:g} s (timed out)"
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"cannot reach the LLM server at {self.url}: {exc.os_error or exc}"
        return f"the LLM server at {self.url} failed: {_describe(exc)}"

    async def _post(self, body: dict[str, Any], put: Any) -> bool:
        """One request; each piece of its answer goes to ``put``. Whether the server sent
        anything (an event, [DONE] or a whole answer)."""
        async with self.http.client.post(
            self.url, json=body, headers=self.headers, timeout=self.timeout
        ) as resp:
            if resp.status != 200:
                text = await resp.text(errors="replace")
                resp.close()  # servers may drop a connection after an error: not reused
                raise RemoteEngineError(_status_message(self.url, resp.status, text))
            if resp.content_type == "application/json":  # the server did not stream
                for piece in _whole_answer(await resp.json(), self.url):
                    put(piece)
                return True
            sent = False
            try:
                async for raw in resp.content:
                    sent = sent or raw.lstrip().startswith(b"data:")
                    for piece in _pieces(raw, self.url):
                        if piece.kind == "done":
                            return True
                        put(piece)
            except asyncio.CancelledError:
                resp.close()  # drop the connection: the server stops generating
                raise
            if not sent:
                resp.close()  # a stream that failed: its connection is not reused
        return sent  # the stream ended without [DONE]: what came is the answer

    async def _post_retried(self, body: dict[str, Any], put: Any) -> bool:
        """``_post``, once more if the server closed the (kept-alive) connection before
        answering anything: a connection the pool kept after the server dropped it."""
        got: list[_Piece] = []

        def keep(piece: _Piece) -> None:
            got.append(piece)
            put(piece)

        try:
            return await self._post(body, keep)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if got:
                raise
            log.info("the LLM server closed a kept connection; asking again")
            return await self._post(body, put)

    async def stream(self, body: dict[str, Any], out: queue.SimpleQueue[_Piece]) -> None:
        """POST ``body`` and put each piece of the answer on ``out``; ends with "done" or
        "error". Cancelling this task closes the connection."""

        def put(piece: _Piece) -> None:
            out.put(piece)
            self.arrived.set()

        try:
            kind = _choice_kind(body)
            if kind in self.unstreamable:
                body = _unstreamed(body)
            if not await self._post_retried(body, put) and kind and body.get("stream"):
                # An empty 200 stream where tools were declared: the server cannot stream this
                # tool choice (llama-cpp-python's chatml-function-calling, for "auto" and
                # "required"). This request and later ones with this choice go unstreamed.
                log.warning(
                    "the LLM server at %s sent an empty stream for tool_choice %s; "
                    "requests with it are no longer streamed",
                    self.url,
                    kind,
                )
                self.unstreamable.add(kind)
                await self._post_retried(_unstreamed(body), put)
        except asyncio.CancelledError:
            raise
        except RemoteEngineError as exc:
            put(_Piece("error", error=exc))
        except (aiohttp.ClientError, OSError) as exc:  # timeouts are OSErrors too
            put(_Piece("error", error=RemoteEngineError(self._failure(exc))))
        except Exception as exc:  # e.g. a malformed JSON body: still this turn's error
            log.debug("LLM request failed", exc_info=exc)
            put(_Piece("error", error=RemoteEngineError(self._failure(exc))))
        finally:
            put(_Piece("done"))  # whatever happened, the reader stops waiting


def _choice_kind(body: dict[str, Any]) -> str:
    """The kind of tool choice a request makes ("" without tools)."""
    if not body.get("tools"):
        return ""
    choice = body.get("tool_choice", "auto")
    return choice if isinstance(choice, str) else "named"


def _unstreamed(body: dict[str, Any]) -> dict[str, Any]:
    body = {**body, "stream": False}
    body.pop("stream_options", None)
    return body


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _status_message(url: str, status: int, body: str) -> str:
    body = " ".join(body.split())[:MAX_ERROR_BODY]
    return f"the LLM server at {url} answered HTTP {status}" + (f": {body}" if body else "")


def _pieces(raw: bytes, url: str) -> Iterator[_Piece]:
    """The pieces in one line of a server-sent event stream."""
    line = raw.decode("utf-8", errors="replace").strip()
    if not line.startswith("data:"):
        return  # blank separators, comments (": ping"), "event:" lines
    data = line[5:].strip()
    if data == "[DONE]":
        yield _Piece("done")
        return
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise RemoteEngineError(f"the LLM server at {url} sent a malformed event: {data[:200]!r}")
    if event.get("error"):
        err = event["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        raise RemoteEngineError(f"the LLM server at {url} failed mid-answer: {msg}")
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            yield _Piece("reasoning", reasoning)
        if delta.get("content"):
            yield _Piece("content", delta["content"])
        yield from _tool_pieces(delta.get("tool_calls"), delta.get("function_call"))
        if choice.get("finish_reason") in ("tool_calls", "function_call"):
            yield _Piece("calls_end")
    if event.get("usage"):
        yield _Piece("usage", usage=event["usage"])


def _whole_answer(event: Any, url: str) -> Iterator[_Piece]:
    """The pieces of a non-streamed answer (a server that ignores ``stream: true``)."""
    try:
        message = event["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise RemoteEngineError(
            f"the LLM server at {url} sent no answer: {str(event)[:200]}"
        ) from None
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        yield _Piece("reasoning", reasoning)
    if message.get("content"):
        yield _Piece("content", message["content"])
    yield from _tool_pieces(message.get("tool_calls"), message.get("function_call"))
    if isinstance(event.get("usage"), dict):
        yield _Piece("usage", usage=event["usage"])


@dataclass
class _Call:
    """One tool call of an answer, put together from its streamed pieces."""

    call_id: str = ""
    name: str = ""
    arguments: str = ""

    def add(self, piece: _Piece) -> None:
        # OpenAI sends the id and name in a call's first piece only; llama.cpp repeats them
        self.call_id = self.call_id or piece.call_id
        self.name = self.name or piece.name
        self.arguments += piece.text

    def event(self) -> TokenEvent:
        return TokenEvent("tool_call", json.dumps({"name": self.name, "arguments": self.arguments}))

    def message(self, n: int) -> dict[str, Any]:
        """The call in an assistant message's ``tool_calls`` (an id made up if none came)."""
        if not self.call_id:
            self.call_id = f"call_{n}"
        args = self.arguments.strip() or "{}"
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": args},
        }


def tool_choice_body(choice: ToolChoice) -> str | dict[str, Any]:
    """``tool_choice`` in the Chat Completions form."""
    name = forced_name(choice)
    if name is None:
        return choice  # "auto" | "none" | "required"
    return {"type": "function", "function": {"name": name}}


@dataclass
class _History:
    messages: list[dict[str, Any]] = field(default_factory=list)
    first: int = 0  # the oldest message still sent


class OpenAICompatSession:
    def __init__(
        self, engine: OpenAICompatEngine, system_prompt: str, sampling: SamplingConfig
    ) -> None:
        self.engine = engine
        self.system_prompt = system_prompt
        self.sampling = sampling
        self.stats = TurnStats()
        self._history = _History()
        self._request: Future[Any] | None = None  # the answer's request, while it runs
        self.tools: tuple[ToolSpec, ...] = ()
        self.tool_choice: ToolChoice = AUTO
        self._calls: list[_Call] = []  # the tool calls of the last answer

    def set_tools(self, tools: tuple[ToolSpec, ...], choice: ToolChoice) -> None:
        self.tools, self.tool_choice = tuple(tools), choice

    def turn_messages(self, turn: UserTurn) -> list[dict[str, Any]]:
        """A turn's messages: the tool outputs it returns (``role: tool``, each with the id of
        the call it answers), then the user's words. With ``tool_results: as_user_text`` the
        outputs and the words are one user message instead."""
        if self.engine.cfg.remote.tool_results == "as_user_text" and turn.tool_results:
            lines = [f"Result of {r.name}: {r.output}" for r in turn.tool_results]
            return [
                {"role": "user", "content": "\n".join([*lines, turn.text] if turn.text else lines)}
            ]
        msgs: list[dict[str, Any]] = []
        last = next((m for m in reversed(self._history.messages) if m["role"] == "assistant"), None)
        open_calls = list((last or {}).get("tool_calls") or ())
        unknown: list[dict[str, Any]] = []
        for r in turn.tool_results:
            call = next((c for c in open_calls if c["function"]["name"] == r.name), None)
            if call is not None:
                open_calls.remove(call)
                call_id = call["id"]
            else:  # an output for a call this history lacks: the call is written before it
                call_id = r.call_id
                fn = {"name": r.name, "arguments": "{}"}
                unknown.append({"id": call_id, "type": "function", "function": fn})
            msgs.append({"role": "tool", "tool_call_id": call_id, "content": r.output})
        if unknown:
            msgs.insert(0, {"role": "assistant", "content": "", "tool_calls": unknown})
        if turn.text or not turn.tool_results:
            msgs.append({"role": "user", "content": turn.text})
        return msgs

    def messages(self, turn: UserTurn) -> list[dict[str, Any]]:
        h = self._history
        return [
            {"role": "system", "content": self.system_prompt},
            *h.messages[h.first :],
            *self.turn_messages(turn),
        ]

    def request_body(self, turn: UserTurn) -> dict[str, Any]:
        """The body of one answer's request."""
        s = self.sampling
        body: dict[str, Any] = {
            "model": self.engine.model,
            "messages": self.messages(turn),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
        }
        if s.top_k > 0:
            body["top_k"] = s.top_k  # not in OpenAI's API: sent only when asked for
        if self.tools:
            body["tools"] = [t.to_openai() for t in self.tools]
            body["tool_choice"] = tool_choice_body(self.tool_choice)
        body.update(self.engine.cfg.remote.extra_body)
        return body

    def listen(self, pcm16k: np.ndarray) -> None:
        """Text engine: the transcript comes from the listener, audio is not used."""

    def respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        self.stats = stats = TurnStats()
        engine = self.engine
        pieces: queue.SimpleQueue[_Piece] = queue.SimpleQueue()
        self._request = request = engine.http.submit(engine.stream(self.request_body(turn), pieces))
        parser = ReasoningParser(in_thinking=False)
        usage: dict[str, Any] | None = None
        self._calls = []
        calls: dict[int, _Call] = {}  # by the server's index, until the calls end

        def end_calls() -> Iterator[TokenEvent]:
            for index in sorted(calls):
                self._calls.append(calls[index])
                yield calls[index].event()
            calls.clear()

        try:
            while not cancel.cancelled:
                try:
                    piece = pieces.get_nowait()
                except queue.Empty:
                    engine.arrived.wait(WAIT_S)
                    engine.arrived.clear()  # a piece for another answer is found by its reader
                    yield None
                    continue
                if piece.kind == "error":
                    assert piece.error is not None
                    raise piece.error
                if piece.kind == "done":
                    break
                if piece.kind == "usage":
                    usage = piece.usage
                    continue
                if piece.kind == "calls_end":
                    yield from end_calls()
                    continue
                now = time.monotonic()
                if stats.wall_first_token is None:
                    stats.wall_first_token = stats.wall_prefill_done = now
                stats.generated_tokens += 1  # one delta is one token on the servers we know
                if piece.kind == "tool":
                    calls.setdefault(piece.index, _Call()).add(piece)
                    continue
                if piece.kind == "reasoning":
                    stats.thinking_tokens += 1
                    yield TokenEvent("thinking", piece.text)
                    continue
                for ev in parser.feed(piece.text):
                    if ev.kind == "answer" and stats.wall_first_answer_token is None:
                        stats.wall_first_answer_token = now
                    if ev.kind == "thinking":
                        stats.thinking_tokens += 1
                    yield ev
                if parser.done:
                    break
            if not cancel.cancelled:
                yield from parser.close()
                yield from end_calls()  # a stream that ended without finish_reason
        finally:
            request.cancel()  # cancelled, failed or finished early: the connection closes
            self._request = None
        if usage:
            stats.prefill_tokens = int(usage.get("prompt_tokens") or 0)
            stats.generated_tokens = int(usage.get("completion_tokens") or stats.generated_tokens)

    def commit(self, turn: UserTurn, spoken_answer: str, interrupted: bool) -> None:
        answer = spoken_answer.strip()
        calls, self._calls = ([] if interrupted else self._calls), []
        if not answer and not interrupted and not calls:
            return  # the answer failed: nothing was said, and the user will ask again
        if interrupted:
            answer = (answer + " ...").strip()
        reply: dict[str, Any] = {"role": "assistant", "content": answer}
        if calls:  # the calls stay in the history: the tool outputs answer them by id
            reply["tool_calls"] = [c.message(i) for i, c in enumerate(calls)]
        h = self._history
        h.messages += [*self.turn_messages(turn), reply]
        keep = max(1, self.engine.cfg.history_turns)
        if len(h.messages) - h.first > 2 * keep:
            oldest = h.first
            h.first = len(h.messages) - 2 * keep  # servers with prefix caching keep the rest
            # a turn with tool calls is longer than two messages: never start inside one (a
            # tool output without its call), start at the user's words that began it
            while h.first > oldest and h.messages[h.first]["role"] != "user":
                h.first -= 1

    def discard(self) -> None:
        """Nothing to undo: a speculative answer's request ends when it is cancelled."""

    def set_instructions(self, system_prompt: str) -> None:
        self.system_prompt = system_prompt

    def close(self) -> None:
        if self._request is not None:
            self._request.cancel()
        self._history = _History()
