"""The state of one ``/v1/realtime`` connection: its session, settings, the response in flight
and the user's input item, and how responses open and close (see ``openai_realtime``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from realtime.audio import StreamResampler
from realtime.server import realtime_protocol as rp
from realtime.server.bridge import (
    AgentSession,
    ServerContext,
)
from realtime.server.realtime_protocol import ClientError

log = logging.getLogger(__name__)

TRANSPORT = "realtime"
MIN_COMMIT_MS = 100
# How long response.create waits for the committed audio's transcript. It waits beside the reader
# (response.cancel ends it), so it can outlast a slow recognizer on a busy machine.
TRANSCRIPT_WAIT_S = 120.0
ANSWER_ERRORS = frozenset({"engine_error", "tts_error", "internal_error"})


@dataclass
class ResponseState:
    id: str = field(default_factory=lambda: rp.new_id("resp"))
    item_id: str = field(default_factory=lambda: rp.new_id("item"))
    item_open: bool = False
    transcript: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    audio_ms: float = 0.0
    input_text: str = ""
    input_ms: float = 0.0
    failed: bool = False
    text_only: bool = False  # written, not spoken (output_modalities ["text"])
    engine_usage: dict[str, int] = field(default_factory=dict)  # the engine's token counts
    n_outputs: int = 0  # output items so far (the message, function calls)
    message_index: int = 0  # the output index of the message item, once it is open
    calls: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (index, item)

    def ids(self) -> dict[str, Any]:
        return {
            "response_id": self.id,
            "item_id": self.item_id,
            "output_index": self.message_index,
            "content_index": 0,
        }


@dataclass
class InputItem:
    """The user audio item being buffered, then committed and transcribed (one per turn)."""

    item_id: str = field(default_factory=lambda: rp.new_id("item"))
    committed: bool = False
    transcribed: asyncio.Event = field(default_factory=asyncio.Event)
    audio_ms: float = 0.0


@dataclass
class RealtimeConnection:
    ctx: ServerContext
    ws: web.WebSocketResponse
    session: AgentSession
    settings: rp.Settings
    voices: set[str]
    beta: bool
    session_id: str = field(default_factory=lambda: rp.new_id("sess"))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    items: dict[str, str] = field(default_factory=dict)  # id -> role, in conversation order
    calls: dict[str, str] = field(default_factory=dict)  # call_id -> tool name (the model's calls)
    user: InputItem = field(default_factory=InputItem)
    awaiting_transcript: InputItem | None = None
    response: ResponseState | None = None
    drop_output: bool = False  # frames of a cancelled answer still in flight
    stop_is_echo: bool = False  # the next SpeechStopped ends a turn committed by the client
    pending_user_text: list[str] = field(default_factory=list)
    last_transcript: str = ""
    last_input_ms: float = 0.0  # the audio of the last committed user turn
    resample: StreamResampler = field(
        default_factory=lambda: StreamResampler(24000, dtype=np.int16)
    )
    # conversation items (retrieve, truncate, delete): each item as last sent, and which turn
    # of the session's history (its answer's response id; the user's part or the answer) an
    # item is; the user and assistant items whose turn has no answer yet
    item_json: dict[str, dict[str, Any]] = field(default_factory=dict)
    item_turn: dict[str, tuple[int, str]] = field(default_factory=dict)
    turn_items: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # work beside the reader

    # ---- work beside the reader ------------------------------------------------------------
    def spawn(self, work: Coroutine[Any, Any, None], event_id: str | None = None) -> None:
        """Run ``work`` (an event's slow part) as a task of this connection, so the reader
        never waits on it; its ``ClientError`` becomes an error event. Cancelled at close."""

        async def run() -> None:
            try:
                await work
            except ClientError as err:
                await self.send_error(err, event_id)
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.exception("realtime %s: background work failed", self.session_id)
                await self.send_error(
                    ClientError(f"internal error: {exc}", code="server_error", kind="server_error"),
                    event_id,
                )

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def cancel_tasks(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- sending -------------------------------------------------------------------------
    async def send(self, type_: str, **body: Any) -> None:
        item = body.get("item")
        if type_ in ("conversation.item.added", "conversation.item.done") and item is not None:
            self.item_json[item["id"]] = item
        if self.beta:
            if type_ in rp.GA_ONLY:
                return
            type_ = rp.BETA_NAMES.get(type_, type_)
        event = {"type": type_, "event_id": rp.new_id("event"), **body}
        async with self.lock:
            if not self.ws.closed:
                await self.ws.send_str(json.dumps(event))

    async def send_error(self, err: ClientError, event_id: str | None = None) -> None:
        self.ctx.metrics.client_errors.labels(TRANSPORT, err.code).inc()
        await self.send(
            "error",
            error={
                "type": err.kind,
                "code": err.code,
                "message": err.message,
                "param": err.param,
                "event_id": event_id,
            },
        )

    def _previous_item(self) -> str | None:
        return next(reversed(self.items), None)

    async def add_item(self, item: dict[str, Any]) -> None:
        previous = self._previous_item()
        self.items[item["id"]] = item.get("role") or item["type"]
        await self.send("conversation.item.added", previous_item_id=previous, item=item)

    # ---- responses -----------------------------------------------------------------------
    async def open_response(self, message: bool = True) -> ResponseState:
        """The response in flight (created now if there is none), with its message item open
        unless ``message`` is False (a function call opens no message)."""
        if self.response is None:
            self.response = ResponseState(
                input_text=self.last_transcript,
                input_ms=self.last_input_ms,
                text_only=self.settings.text_only,
            )
            await self.send("response.created", response=self._response_json("in_progress"))
        r = self.response
        if message and not r.item_open:
            r.item_open = True
            r.message_index, r.n_outputs = r.n_outputs, r.n_outputs + 1
            item = rp.assistant_item(r.item_id, "in_progress", None, self.beta, r.text_only)
            await self.send(
                "response.output_item.added",
                response_id=r.id,
                output_index=r.message_index,
                item=item,
            )
            await self.add_item(item)
            self.turn_items.append(r.item_id)
            await self.send(
                "response.content_part.added", **r.ids(), part=content_part("", r.text_only)
            )
        return r

    async def add_call(self, call_id: str, name: str, arguments: str) -> None:
        """A function call of the model: its own output item, its arguments, and no audio."""
        r = await self.open_response(message=False)
        index, r.n_outputs = r.n_outputs, r.n_outputs + 1
        item_id = rp.new_id("item")
        item = rp.function_call_item(item_id, call_id, name, "", "in_progress")
        await self.send(
            "response.output_item.added", response_id=r.id, output_index=index, item=item
        )
        await self.add_item(item)
        where = {"response_id": r.id, "item_id": item_id, "output_index": index, "call_id": call_id}
        await self.send("response.function_call_arguments.delta", **where, delta=arguments)
        await self.send(
            "response.function_call_arguments.done", **where, name=name, arguments=arguments
        )
        done = rp.function_call_item(item_id, call_id, name, arguments, "completed")
        await self.send(
            "response.output_item.done", response_id=r.id, output_index=index, item=done
        )
        await self.send("conversation.item.done", item=done)
        r.calls.append((index, done))
        self.calls[call_id] = name

    def _response_json(self, status: str, reason: str | None = None) -> dict[str, Any]:
        r = self.response
        assert r is not None
        outputs: list[tuple[int, dict[str, Any]]] = list(r.calls)
        if r.item_open:
            item_status = "completed" if status == "completed" else "incomplete"
            text = "".join(r.transcript)
            item = rp.assistant_item(r.item_id, item_status, text, self.beta, r.text_only)
            outputs.append((r.message_index, item))
        out = [item for _, item in sorted(outputs, key=lambda o: o[0])]
        body: dict[str, Any] = {
            "object": "realtime.response",
            "id": r.id,
            "status": status,
            "status_details": None if reason is None else {"type": status, "reason": reason},
            "output": out,
            "conversation_id": self.session_id,
            "output_modalities": ["text"] if r.text_only else ["audio"],
            "audio": {
                "output": {
                    "format": self.settings.output_format.to_json(self.beta),
                    "voice": self.settings.voice,
                }
            },
            "usage": None,
        }
        if status != "in_progress":
            body["usage"] = rp.usage_json(r.engine_usage, r.input_ms, r.audio_ms)
        return body

    async def finish_response(self, status: str, reason: str | None = None) -> None:
        r = self.response
        if r is None:
            return
        text = "".join(r.transcript)
        if r.item_open:
            ids = r.ids()
            if r.reasoning:
                await self.send(rp.REASONING_DONE, **ids, text="".join(r.reasoning))
            if r.text_only:
                await self.send("response.output_text.done", **ids, text=text)
            else:
                await self.send("response.output_audio.done", **ids)
                await self.send("response.output_audio_transcript.done", **ids, transcript=text)
            await self.send(
                "response.content_part.done", **ids, part=content_part(text, r.text_only)
            )
            item_status = "completed" if status == "completed" else "incomplete"
            item = rp.assistant_item(r.item_id, item_status, text, self.beta, r.text_only)
            await self.send(
                "response.output_item.done",
                response_id=r.id,
                output_index=r.message_index,
                item=item,
            )
            await self.send("conversation.item.done", item=item)
        await self.send("response.done", response=self._response_json(status, reason))
        self.response = None
        if r.text_only != self.settings.text_only:  # a per-response override ends here
            self.session.update(speak=not self.settings.text_only)

    # ---- user turns ----------------------------------------------------------------------
    async def commit_user_turn(self) -> None:
        turn = self.user
        if turn.committed:
            return
        turn.committed = True
        for text in self.pending_user_text:
            self.session.add_message("user", text)
        self.pending_user_text.clear()
        previous = self._previous_item()
        await self.send(
            "input_audio_buffer.committed", previous_item_id=previous, item_id=turn.item_id
        )
        await self.add_item(rp.user_audio_item(turn.item_id, None, self.beta))
        self.turn_items.append(turn.item_id)
        self.awaiting_transcript = turn
        self.last_input_ms = turn.audio_ms
        self.user = InputItem()
        self.drop_output = False

    def bind_turn(self, response_id: int | None) -> None:
        """The session's answer ``response_id`` is done: the items waiting for their turn are
        that turn's (the user's part, the answer)."""
        if response_id is None:
            return
        for item_id in self.turn_items:
            role = self.items.get(item_id)
            if role is not None:
                self.item_turn[item_id] = (response_id, role)
        self.turn_items.clear()

    async def on_transcript(self, text: str) -> None:
        turn = self.awaiting_transcript
        self.last_transcript = text
        if turn is None or turn.transcribed.is_set():
            return
        turn.transcribed.set()
        await self.send(
            "conversation.item.input_audio_transcription.completed",
            item_id=turn.item_id,
            content_index=0,
            transcript=text,
            usage={"type": "duration", "seconds": round(turn.audio_ms / 1000, 3)},
        )
        await self.send(
            "conversation.item.done", item=rp.user_audio_item(turn.item_id, text, self.beta)
        )


def content_part(text: str, text_only: bool) -> dict[str, Any]:
    """A content part as the ``response.content_part.*`` events carry it."""
    return {"type": "text", "text": text} if text_only else {"type": "audio", "transcript": text}


# ---- session frames -> server events ---------------------------------------------------------
