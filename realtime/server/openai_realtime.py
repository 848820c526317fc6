"""``/v1/realtime``: the OpenAI Realtime API over a WebSocket, so existing clients (the
official ``openai`` SDK among them) talk to the local agent unchanged.

One ``RealtimeConnection`` per socket: the reader turns client events into session calls,
``_pump`` turns the session's frames into server events. A response opens lazily on its
first output (or at once on ``response.create``) and closes on the turn's ``TurnMetrics``
(completed), an ``Interruption`` / ``response.cancel`` (cancelled) or a fatal error (failed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from realtime.audio import StreamResampler
from realtime.config import VADConfig
from realtime.frames import (
    AnswerText,
    EndFrame,
    ErrorFrame,
    Interruption,
    OutputAudio,
    SpeechStarted,
    SpeechStopped,
    ThinkingText,
    Transcript,
    TurnMetrics,
)
from realtime.server import realtime_protocol as rp
from realtime.server.bridge import (
    AgentSession,
    CapacityError,
    ServerContext,
    run_connection,
)
from realtime.server.codecs import AudioDecodeError, b64decode_strict
from realtime.server.realtime_protocol import ClientError

log = logging.getLogger(__name__)
TRANSPORT = "realtime"
MIN_COMMIT_MS = 100
TRANSCRIPT_WAIT_S = 30.0
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

    def ids(self) -> dict[str, Any]:
        return {
            "response_id": self.id,
            "item_id": self.item_id,
            "output_index": 0,
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

    # ---- sending -------------------------------------------------------------------------
    async def send(self, type_: str, **body: Any) -> None:
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
        self.items[item["id"]] = item["role"]
        await self.send("conversation.item.added", previous_item_id=previous, item=item)

    # ---- responses -----------------------------------------------------------------------
    async def open_response(self) -> ResponseState:
        if self.response is None:
            self.response = ResponseState(
                input_text=self.last_transcript,
                input_ms=self.last_input_ms,
                text_only=self.settings.text_only,
            )
            await self.send("response.created", response=self._response_json("in_progress"))
        r = self.response
        if not r.item_open:
            r.item_open = True
            item = rp.assistant_item(r.item_id, "in_progress", None, self.beta, r.text_only)
            await self.send(
                "response.output_item.added", response_id=r.id, output_index=0, item=item
            )
            await self.add_item(item)
            await self.send("response.content_part.added", **r.ids(), part=_part("", r.text_only))
        return r

    def _response_json(self, status: str, reason: str | None = None) -> dict[str, Any]:
        r = self.response
        assert r is not None
        out = []
        if r.item_open:
            item_status = "completed" if status == "completed" else "incomplete"
            text = "".join(r.transcript)
            out.append(rp.assistant_item(r.item_id, item_status, text, self.beta, r.text_only))
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
            await self.send("response.content_part.done", **ids, part=_part(text, r.text_only))
            item_status = "completed" if status == "completed" else "incomplete"
            item = rp.assistant_item(r.item_id, item_status, text, self.beta, r.text_only)
            await self.send(
                "response.output_item.done", response_id=r.id, output_index=0, item=item
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
        self.awaiting_transcript = turn
        self.last_input_ms = turn.audio_ms
        self.user = InputItem()
        self.drop_output = False

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


def _part(text: str, text_only: bool) -> dict[str, Any]:
    """A content part as the ``response.content_part.*`` events carry it."""
    return {"type": "text", "text": text} if text_only else {"type": "audio", "transcript": text}


# ---- session frames -> server events ---------------------------------------------------------
async def _pump(conn: RealtimeConnection) -> None:
    async for frame in conn.session.frames():
        if isinstance(frame, OutputAudio):
            if conn.drop_output or (conn.response is not None and conn.response.text_only):
                continue
            r = await conn.open_response()
            fmt = conn.settings.output_format
            if conn.resample.out_rate != fmt.rate:
                conn.resample = StreamResampler(fmt.rate, dtype=np.int16)
            pcm = conn.resample(frame.pcm, frame.sample_rate)
            r.audio_ms += 1000 * len(pcm) / fmt.rate
            await conn.send(
                "response.output_audio.delta",
                **r.ids(),
                delta=base64.b64encode(fmt.encode(pcm)).decode("ascii"),
            )
        elif isinstance(frame, (AnswerText, ThinkingText)):
            if conn.drop_output or not frame.text:
                continue
            r = await conn.open_response()
            ids = r.ids()
            if isinstance(frame, AnswerText):
                r.transcript.append(frame.text)
                kind = (
                    "response.output_text.delta"
                    if r.text_only
                    else "response.output_audio_transcript.delta"
                )
                await conn.send(kind, **ids, delta=frame.text)
            else:
                r.reasoning.append(frame.text)
                await conn.send(rp.REASONING_DELTA, **ids, delta=frame.text)
        elif isinstance(frame, (SpeechStarted, SpeechStopped)) and (
            conn.settings.turn_detection is None
        ):
            continue  # manual turns: the client commits, VAD events are not part of the API
        elif isinstance(frame, SpeechStarted):
            conn.stop_is_echo = False
            conn.user.audio_ms = 0.0
            start_ms = max(0, int(frame.t * 1000))
            await conn.send(
                "input_audio_buffer.speech_started",
                audio_start_ms=start_ms,
                item_id=conn.user.item_id,
            )
        elif isinstance(frame, SpeechStopped):
            if conn.stop_is_echo:  # the end of a turn the client committed itself
                conn.stop_is_echo = False
                continue
            turn = conn.user
            turn.audio_ms = max(turn.audio_ms, frame.t_end * 1000)
            await conn.send(
                "input_audio_buffer.speech_stopped",
                audio_end_ms=int(frame.t_end * 1000),
                item_id=turn.item_id,
            )
            await conn.commit_user_turn()
        elif isinstance(frame, Transcript):
            if frame.final:
                await conn.on_transcript(frame.text)
        elif isinstance(frame, Interruption):
            conn.drop_output = True
            await conn.finish_response("cancelled", "turn_detected")
        elif isinstance(frame, TurnMetrics):
            conn.ctx.metrics.observe_turn(TRANSPORT, frame)
            if frame.transcript and conn.awaiting_transcript is not None:
                await conn.on_transcript(frame.transcript)
            if conn.response is not None:
                conn.response.engine_usage = dict(frame.usage)
            if not frame.interrupted and conn.response is not None:
                if conn.response.failed:
                    await conn.finish_response("failed", "error")
                else:
                    await conn.finish_response("completed")
            conn.drop_output = False
        elif isinstance(frame, ErrorFrame):
            err = ClientError(frame.message, code=frame.code, kind="server_error")
            await conn.send_error(err)
            if conn.awaiting_transcript is not None:  # e.g. no_speech: no transcript will come
                conn.awaiting_transcript.transcribed.set()
            if conn.response is not None and frame.code in ANSWER_ERRORS:
                conn.response.failed = True  # it ends with the turn's TurnMetrics
            if frame.fatal:
                await conn.finish_response("failed", "error")
        elif isinstance(frame, EndFrame):
            await conn.finish_response("cancelled", "session_ended")
            break


# ---- client events -> session calls ------------------------------------------------------------
def _apply_settings(conn: RealtimeConnection, new: rp.Settings, base_vad: VADConfig) -> None:
    old = conn.settings
    changes: dict[str, Any] = {}
    if new.instructions != old.instructions:
        changes["instructions"] = new.instructions
    if new.voice != old.voice:
        changes["voice"] = new.voice
    if new.speed != old.speed:
        changes["speaking_rate"] = new.speed
    if new.output_format.rate != old.output_format.rate:
        changes["output_sample_rate"] = new.output_format.rate
    if new.text_only != old.text_only:
        changes["speak"] = not new.text_only
    if new.turn_detection != old.turn_detection:
        td = new.turn_detection
        if td is None:
            changes.update(turn_detection=False, create_response=False)
        else:
            changes.update(
                turn_detection=True,
                create_response=td.create_response,
                interrupt_response=td.interrupt_response,
                vad=dataclasses.replace(
                    base_vad,
                    aggressiveness=td.aggressiveness,
                    prefix_padding_ms=td.prefix_padding_ms,
                    silence_duration_ms=td.silence_duration_ms,
                ),
            )
    if changes:
        try:
            conn.session.update(**changes)
        except (ValueError, TypeError) as exc:
            raise ClientError(f"the session refused the update: {exc}", param="session") from None
    conn.settings = new


AUDIO_PARTS = ("input_audio", "audio", "output_audio")


async def _content_text(conn: RealtimeConnection, item: dict[str, Any], role: str) -> str:
    """The words of a message item: text parts as they are; a user's ``input_audio`` part
    (base64 in the session's input format) transcribed; an assistant's audio part by its
    transcript."""
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ClientError("item.content must be a non-empty list", param="item.content")
    parts = []
    for i, part in enumerate(content):
        param = f"item.content[{i}]"
        if not isinstance(part, dict):
            raise ClientError("each content part must be an object", param=param)
        kind = part.get("type")
        transcript = part.get("transcript")
        if kind in ("input_text", "text", "output_text") and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "input_audio" and role == "user" and isinstance(part.get("audio"), str):
            parts.append(await _transcribe_part(conn, part["audio"], f"{param}.audio"))
        elif kind in AUDIO_PARTS and isinstance(transcript, str):
            parts.append(transcript)  # audio already heard (e.g. an earlier answer): its words
        else:
            raise ClientError(
                f"content part of type {kind!r} is not supported here: send input_text/text "
                "parts, input_audio with base64 'audio' (user items), or audio with a "
                "'transcript'",
                param=f"{param}.type",
            )
    return " ".join(p.strip() for p in parts if p.strip())


async def _transcribe_part(conn: RealtimeConnection, audio: str, param: str) -> str:
    fmt = conn.settings.input_format
    try:
        pcm = fmt.decode(b64decode_strict(audio))
    except AudioDecodeError as exc:
        raise ClientError(str(exc), code="invalid_audio", param=param) from None
    if pcm.size == 0:
        raise ClientError("the audio part is empty", code="invalid_audio", param=param)
    try:
        return await conn.session.transcribe(pcm, fmt.rate)
    except ValueError as exc:  # AudioFormatError too
        raise ClientError(str(exc), code="invalid_audio", param=param) from None


def _response_text_only(body: Any, default: bool) -> bool:
    """``response.create``'s own ``output_modalities`` (beta ``modalities``), if it has one."""
    if body is None:
        return default
    if not isinstance(body, dict):
        raise ClientError("response must be an object", param="response")
    for key in ("output_modalities", "modalities"):
        if body.get(key) is not None:
            return rp.parse_modalities(body[key], f"response.{key}")
    return default


async def _handle_event(
    conn: RealtimeConnection, event: dict[str, Any], base_vad: VADConfig
) -> None:
    kind = event.get("type")
    s = conn.session
    if kind == "input_audio_buffer.append":
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise ClientError("input_audio_buffer.append needs 'audio' (base64)", param="audio")
        fmt = conn.settings.input_format
        try:
            pcm = fmt.decode(b64decode_strict(audio))
        except AudioDecodeError as exc:
            raise ClientError(str(exc), code="invalid_audio", param="audio") from None
        if pcm.size == 0:
            return
        try:
            await s.push_audio(pcm, fmt.rate)
        except ValueError as exc:
            raise ClientError(str(exc), code="invalid_audio", param="audio") from None
        conn.user.audio_ms += 1000 * pcm.size / fmt.rate
    elif kind == "input_audio_buffer.commit":
        if conn.user.audio_ms < MIN_COMMIT_MS:
            raise ClientError(
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, "
                f"have {conn.user.audio_ms:.0f} ms",
                code="input_audio_buffer_commit_empty",
            )
        conn.stop_is_echo = conn.settings.turn_detection is not None
        await s.commit()
        await conn.commit_user_turn()
    elif kind == "input_audio_buffer.clear":
        await s.clear()
        conn.user = InputItem()
        await conn.send("input_audio_buffer.cleared")
    elif kind == "session.update":
        new = rp.parse_session_update(event.get("session"), conn.settings, conn.voices)
        _apply_settings(conn, new, base_vad)
        await conn.send("session.updated", session=rp.session_json(conn.session_id, new, conn.beta))
    elif kind == "response.create":
        if conn.response is not None:
            raise ClientError(
                "a response is already in progress; cancel it or wait for response.done",
                code="conversation_already_has_active_response",
            )
        turn = conn.awaiting_transcript
        if turn is not None and not conn.pending_user_text:
            # the committed audio is still being transcribed: answer it once it is
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(turn.transcribed.wait(), TRANSCRIPT_WAIT_S)
        text_only = _response_text_only(event.get("response"), conn.settings.text_only)
        conn.drop_output = False
        conn.response = rp_response = ResponseState(
            input_text=" ".join(conn.pending_user_text),
            input_ms=0.0 if conn.pending_user_text else conn.last_input_ms,
            text_only=text_only,
        )
        if text_only != conn.settings.text_only:
            s.update(speak=not text_only)  # for this response only: restored when it is done
        await conn.send("response.created", response=conn._response_json("in_progress"))
        text = " ".join(conn.pending_user_text) or None
        conn.pending_user_text.clear()
        try:
            await s.respond(text)
        except ValueError as exc:
            if conn.response is rp_response:
                await conn.finish_response("failed", "error")
            raise ClientError(f"cannot respond: {exc}", code="response_failed") from None
    elif kind == "response.cancel":
        if conn.response is None:
            raise ClientError(
                "there is no response in progress to cancel", code="response_cancel_not_active"
            )
        conn.drop_output = True
        await s.cancel()
        await conn.finish_response("cancelled", "client_cancelled")
    elif kind == "conversation.item.create":
        item = event.get("item")
        if not isinstance(item, dict):
            raise ClientError("conversation.item.create needs an 'item' object", param="item")
        if item.get("type", "message") != "message":
            raise ClientError(
                f"item type {item.get('type')!r} is not supported (only 'message')",
                param="item.type",
            )
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise ClientError("item.role must be user, assistant or system", param="item.role")
        text = await _content_text(conn, item, role)
        if role == "user":
            conn.pending_user_text.append(text)
        else:
            s.add_message(role, text)
        item_id = item.get("id") if isinstance(item.get("id"), str) else rp.new_id("item")
        heard = role == "user" and any(
            isinstance(p, dict) and p.get("type") == "input_audio" for p in item["content"]
        )
        full = (
            rp.user_audio_item(item_id, text, conn.beta)
            if heard
            else rp.text_item(item_id, role, text, conn.beta)
        )
        await conn.add_item(full)
        await conn.send("conversation.item.done", item=full)
    elif kind == "conversation.item.truncate":
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        if conn.items.get(item_id) != "assistant":
            raise ClientError(f"no assistant item {item_id!r} to truncate", param="item_id")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise ClientError("audio_end_ms must be a non-negative integer", param="audio_end_ms")
        if item_id == next((i for i in reversed(conn.items) if conn.items[i] == "assistant"), None):
            s.truncate(end_ms)
        await conn.send(
            "conversation.item.truncated",
            item_id=item_id,
            content_index=event.get("content_index", 0),
            audio_end_ms=end_ms,
        )
    elif kind == "conversation.item.delete":
        item_id = event.get("item_id")
        if item_id not in conn.items:
            raise ClientError(f"no item {item_id!r} in the conversation", param="item_id")
        del conn.items[item_id]
        delete = getattr(s, "delete_item", None)
        if delete is not None:
            delete(item_id)
        await conn.send("conversation.item.deleted", item_id=item_id)
    elif isinstance(kind, str):
        raise ClientError(f"unknown event type {kind!r}", code="unknown_event", param="type")
    else:
        raise ClientError("every event needs a string 'type'", code="invalid_event", param="type")


def _parse_message(data: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise ClientError(
            f"message of {len(data)} bytes exceeds the limit of {limit} bytes; "
            "send audio in smaller appends",
            code="message_too_large",
        )
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ClientError(f"message is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(event, dict):
        raise ClientError("an event must be a JSON object", code="invalid_event")
    return event


def _is_beta(request: web.Request) -> bool:
    header = request.headers.get("OpenAI-Beta", "")
    protocols = request.headers.get("Sec-WebSocket-Protocol", "")
    return "realtime=v1" in header or "openai-beta.realtime-v1" in protocols


def _defaults(ctx: ServerContext, model: str) -> tuple[rp.Settings, set[str], VADConfig]:
    cfg = getattr(ctx.runtime, "config", None)
    vad = dataclasses.replace(cfg.vad) if cfg is not None else VADConfig()
    voice = cfg.tts.voice if cfg is not None else "default"
    instructions = cfg.engine.system_prompt if cfg is not None else ""
    voices = {voice}
    tts = getattr(ctx.runtime, "tts", None)
    lister = getattr(tts, "voices", None) or getattr(ctx.runtime, "voices", None)
    if callable(lister):
        with contextlib.suppress(Exception):
            voices |= set(lister())
    td = rp.TurnDetection(
        threshold=min(1.0, vad.aggressiveness / 4 + 0.125),
        prefix_padding_ms=vad.prefix_padding_ms,
        silence_duration_ms=vad.silence_duration_ms,
    )
    settings = rp.Settings(model=model, instructions=instructions, voice=voice, turn_detection=td)
    return settings, voices, vad


def make_handler(ctx: ServerContext) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    limit = ctx.config.max_message_bytes

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("realtime",), max_msg_size=limit * 4, heartbeat=30)
        await ws.prepare(request)
        beta = _is_beta(request)
        settings, voices, base_vad = _defaults(ctx, request.query.get("model", "local-agent"))
        try:
            session = await ctx.open_session(TRANSPORT, pace_output=False, output_sample_rate=24000)
        except CapacityError as exc:
            await ws.send_str(
                json.dumps(
                    {
                        "type": "error",
                        "event_id": rp.new_id("event"),
                        "error": {
                            "type": "server_error",
                            "code": "session_limit_reached",
                            "message": str(exc),
                            "param": None,
                            "event_id": None,
                        },
                    }
                )
            )
            await ws.close(code=1013, message=b"server full")
            return ws
        conn = RealtimeConnection(
            ctx=ctx, ws=ws, session=session, settings=settings, voices=voices, beta=beta
        )

        async def greet_then_read() -> None:
            await conn.send(
                "session.created", session=rp.session_json(conn.session_id, settings, beta)
            )
            await _read_loop(conn, base_vad)

        await run_connection(ctx, TRANSPORT, session, ws, _pump(conn), greet_then_read())
        return ws

    async def _read_loop(conn: RealtimeConnection, base_vad: VADConfig) -> None:
        ws = conn.ws
        while not ws.closed:
            try:
                msg = await ws.receive(timeout=ctx.config.idle_timeout_s)
            except asyncio.TimeoutError:
                await conn.send_error(
                    ClientError(
                        f"no event for {ctx.config.idle_timeout_s:.0f} s; closing",
                        code="idle_timeout",
                    )
                )
                return
            if msg.type == WSMsgType.TEXT:
                event: dict[str, Any] = {}
                try:
                    event = _parse_message(msg.data, limit)
                    await _handle_event(conn, event, base_vad)
                except ClientError as err:
                    eid = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await conn.send_error(err, eid)
                except (ConnectionResetError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a pipeline fault must not end the connection
                    log.exception("realtime event %r failed", event.get("type"))
                    await conn.send_error(
                        ClientError(
                            f"internal error handling {event.get('type')!r}: {exc}",
                            code="server_error",
                            kind="server_error",
                        )
                    )
            elif msg.type == WSMsgType.BINARY:
                await conn.send_error(
                    ClientError(
                        "binary messages are not part of this protocol; send JSON text events",
                        code="invalid_event",
                    )
                )
            elif msg.type in (
                WSMsgType.CLOSE,
                WSMsgType.CLOSING,
                WSMsgType.CLOSED,
                WSMsgType.ERROR,
            ):
                return

    return handler
