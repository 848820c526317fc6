"""``/v1/realtime``: the OpenAI Realtime API over a WebSocket, so existing clients (the
official ``openai`` SDK among them) talk to the local agent unchanged.

One ``RealtimeConnection`` per socket (``realtime_connection``): the reader turns client
events into session calls (``realtime_events``), ``_pump`` here turns the session's frames
into server events. A response opens lazily on its
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
    ToolCall,
    Transcript,
    TurnMetrics,
)
from realtime.server import realtime_protocol as rp
from realtime.server.auth import principal
from realtime.server.bridge import (
    WRITE_BUFFER_BYTES,
    CapacityError,
    LiveSession,
    Notice,
    ServerContext,
    bound_write_buffer,
    run_connection,
)
from realtime.server.realtime_connection import (
    ANSWER_ERRORS,
    TRANSPORT,
    RealtimeConnection,
)
from realtime.server.realtime_events import handle_event, parse_message
from realtime.server.realtime_protocol import ClientError

log = logging.getLogger(__name__)


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
        elif isinstance(frame, ToolCall):
            if not conn.drop_output:
                await conn.add_call(frame.call_id, frame.name, frame.arguments)
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
            conn.bind_turn(frame.response_id)
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


async def _send_raw_error(ws: web.WebSocketResponse, kind: str, code: str, message: str) -> None:
    """An ``error`` event on a socket that has no connection state (refused at the door)."""
    error = {"type": kind, "code": code, "message": message, "param": None, "event_id": None}
    with contextlib.suppress(Exception):
        await ws.send_str(
            json.dumps({"type": "error", "event_id": rp.new_id("event"), "error": error})
        )


def make_handler(ctx: ServerContext) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    limit = ctx.config.max_message_bytes

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            protocols=("realtime",),
            max_msg_size=limit * 4,
            heartbeat=30,
            writer_limit=WRITE_BUFFER_BYTES,
        )
        await ws.prepare(request)
        bound_write_buffer(request)
        beta = _is_beta(request)
        settings, voices, base_vad = _defaults(ctx, request.query.get("model", "local-agent"))
        try:
            live = await ctx.open_session(
                TRANSPORT, pace_output=False, key=principal(request), output_sample_rate=24000
            )
        except CapacityError as exc:
            await _send_raw_error(ws, "server_error", exc.code, exc.message)
            await ws.close(code=1013, message=exc.code.encode())
            return ws
        session = live.session
        conn = RealtimeConnection(
            ctx=ctx,
            ws=ws,
            session=session,
            settings=settings,
            voices=voices,
            beta=beta,
            session_id=live.id,  # the id the client sees is the one the logs name
        )

        async def notify(notice: Notice) -> None:  # the server's doing: no client error counted
            error = {"type": "server_error", "code": notice.code, "message": notice.message}
            await conn.send("error", error={**error, "param": None, "event_id": None})

        async def hangup(notice: Notice) -> None:
            await ws.close(code=notice.ws_code, message=notice.code.encode())

        live.attach(notify, hangup)

        async def greet_then_read() -> None:
            await conn.send(
                "session.created", session=rp.session_json(conn.session_id, settings, beta)
            )
            try:
                await _read_loop(conn, live, base_vad)
            finally:  # the connection's own tasks end before its session closes
                await conn.cancel_tasks()

        async def notify(message: str) -> None:
            await conn.send_error(ClientError(message, code="output_queue_full"))

        await run_connection(ctx, live, ws, _pump(conn), greet_then_read(), request, notify)
        return ws

    async def _read_loop(conn: RealtimeConnection, live: LiveSession, base_vad: VADConfig) -> None:
        ws = conn.ws
        while not ws.closed:
            msg = await ws.receive()
            live.touch()
            if msg.type == WSMsgType.TEXT:
                event: dict[str, Any] = {}
                try:
                    event = parse_message(msg.data, limit)
                    await handle_event(conn, event, base_vad)
                except ClientError as err:
                    eid = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await conn.send_error(err, eid)
                except (ConnectionResetError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a pipeline fault must not end the connection
                    log.exception(
                        "realtime session %s: event %r failed", live.id, event.get("type")
                    )
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
