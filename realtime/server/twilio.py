"""``/twilio``: Twilio Media Streams, so a call center points ``<Connect><Stream>`` at the agent.

Inbound ``media`` is 8 kHz mu-law, 20 ms a message. The answer goes back as 20 ms mu-law
``media`` messages in real time: the session paces its output (``Output``) at most
``telephony.playout_lead_ms`` ahead of what the caller hears, so Twilio's play-out buffer
holds that lead and no more (the first audio goes at once). A ``mark`` follows every piece
boundary and the end of the answer, named ``"<response id>:<ms>"``: the answer's audio before
the mark, on the session's own clock of the answer (``-end`` added to the last). Twilio echoes
a mark when the audio before it has played, so the echoed marks say how much the caller really
heard.

Speech of the caller over the answer is judged by the turn controller (``barge_in``): a
backchannel ("uh-huh") changes nothing here, the answer plays on. An ``Interruption`` stops the
answer: the session drops the audio it still held (never sent), the handler sends ``clear``
(Twilio drops the lead it holds) and truncates the answer in the session's history, the
engine's too, at the last echoed mark: the words before it stay, those after it go. An answer
handed out whole before the speech was judged an interruption is not interrupted: its last
lead plays.

A ``dtmf`` message (a key the caller pressed) goes to the session (``press_key``).

Bad messages get ``{"event": "error", "error": {"code", "message"}}`` back (Twilio logs and
ignores events it does not know); a stream in another media format is refused and closed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from realtime.audio import StreamResampler
from realtime.config import TelephonyConfig
from realtime.frames import EndFrame, Interruption, OutputAudio, TurnMetrics
from realtime.server import json_depth
from realtime.server.bridge import (
    WRITE_BUFFER_BYTES,
    AgentSession,
    CapacityError,
    LiveSession,
    Notice,
    ServerContext,
    bound_write_buffer,
    run_connection,
)
from realtime.server.codecs import (
    AudioDecodeError,
    b64decode_strict,
    ulaw_decode,
    ulaw_encode,
)

log = logging.getLogger(__name__)
TRANSPORT = "twilio"
RATE = 8000
FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law


class TwilioError(ValueError):
    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass
class TwilioCall:
    ctx: ServerContext
    ws: web.WebSocketResponse
    session: AgentSession
    stream_sid: str | None = None
    call_sid: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    answer: int | None = None  # the session's response id of the answer being sent
    audio_s: float = 0.0  # audio of the current answer sent, on the session's clock
    sent_ms: float = 0.0  # mu-law audio of the current answer sent to Twilio (with padding)
    played_ms: float = 0.0  # audio of the current answer (session clock) Twilio has played
    outstanding: set[str] = field(default_factory=set)  # marks sent, not yet echoed
    acked: deque[str] = field(default_factory=lambda: deque(maxlen=64))  # echoed, in order
    pending: bytearray = field(default_factory=bytearray)  # mu-law not yet a whole frame
    resample: StreamResampler = field(default_factory=lambda: StreamResampler(RATE, dtype=np.int16))
    cut: tuple[int, float] | None = None  # an interrupted answer and the ms of it heard
    media_in: int = 0
    dtmf: int = 0  # keys pressed (which ones is the caller's business: never logged)

    async def send(self, message: dict[str, Any]) -> None:
        async with self.lock:
            if not self.ws.closed:
                await self.ws.send_str(json.dumps(message))

    async def send_error(self, err: TwilioError) -> None:
        self.ctx.metrics.client_errors.labels(TRANSPORT, err.code).inc()
        log.info("twilio stream %s: %s", self.stream_sid, err.message)
        await self.send(
            {
                "event": "error",
                "streamSid": self.stream_sid,
                "error": {"code": err.code, "message": err.message},
            }
        )

    async def send_audio(self, ulaw: bytes) -> None:
        self.pending.extend(ulaw)
        while len(self.pending) >= FRAME_BYTES:
            chunk = bytes(self.pending[:FRAME_BYTES])
            del self.pending[:FRAME_BYTES]
            await self._media(chunk)

    async def _media(self, chunk: bytes) -> None:
        self.sent_ms += 1000 * len(chunk) / RATE
        payload = base64.b64encode(chunk).decode("ascii")
        await self.send(
            {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
        )

    async def flush(self) -> None:
        if self.pending:
            chunk = bytes(self.pending) + b"\xff" * (FRAME_BYTES - len(self.pending))
            self.pending.clear()
            await self._media(chunk)

    async def mark(self, label: str = "") -> None:
        """A mark after the audio sent so far: named by the answer and the audio before it (ms,
        rounded down, on the session's clock: the piece that starts here is not before it)."""
        name = f"{self.answer}:{int(self.audio_s * 1000)}{label}"
        self.outstanding.add(name)
        await self.send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def on_mark(self, name: str) -> None:
        if name not in self.outstanding:
            return  # not ours, or of audio already cleared
        self.outstanding.discard(name)
        self.acked.append(name)
        answer, _, rest = name.partition(":")
        ms = rest.split("-", 1)[0]
        if answer == str(self.answer) and ms.isdigit():
            self.played_ms = max(self.played_ms, float(ms))

    async def barge_in(self) -> None:
        """The answer was interrupted: Twilio drops what it still holds of it (the lead), and
        the answer's history is cut at what was heard (``truncate``)."""
        sent_ms = self.audio_s * 1000
        if self.answer is None or (sent_ms <= self.played_ms and not self.pending):
            return  # everything sent has played: nothing to cut
        self.pending.clear()
        self.outstanding.clear()  # Twilio echoes the cleared marks: they count for nothing
        self.cut, self.played_ms = (self.answer, self.played_ms), sent_ms
        await self.send({"event": "clear", "streamSid": self.stream_sid})

    def truncate(self) -> None:
        """Cut the interrupted answer in the history at the last mark Twilio echoed (called
        once the answer is in the history: at its ``TurnMetrics``)."""
        if self.cut is None:
            return
        (answer, heard), self.cut = self.cut, None
        try:
            self.session.truncate(int(heard), answer)
        except KeyError:  # the answer never reached the history (nothing of it was kept)
            pass

    def new_answer(self, response_id: int | None) -> None:
        self.answer = response_id
        self.audio_s = self.sent_ms = self.played_ms = 0.0


async def _pump(call: TwilioCall) -> None:
    in_answer = False
    async for frame in call.session.frames():
        if isinstance(frame, OutputAudio):
            if call.stream_sid is None:
                continue
            if not in_answer:
                call.new_answer(frame.response_id)
                in_answer = True
            elif frame.text:
                await call.flush()
                await call.mark()  # a piece boundary
            call.audio_s += len(frame.pcm) / frame.sample_rate
            await call.send_audio(ulaw_encode(call.resample(frame.pcm, frame.sample_rate)))
        elif isinstance(frame, Interruption):
            # judged by the turn controller: a backchannel is none, and cuts nothing. The
            # session has dropped what it held of the answer; Twilio holds only the lead
            if in_answer:
                await call.barge_in()
            in_answer = False
        elif isinstance(frame, TurnMetrics):
            call.ctx.metrics.observe_turn(TRANSPORT, frame)
            call.truncate()  # after an Interruption: the answer is in the history now
            if in_answer:
                await call.flush()
                await call.mark("-end")
            in_answer = False
        elif isinstance(frame, EndFrame):
            break


def _parse(data: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise TwilioError("message_too_large", f"message of {len(data)} bytes exceeds {limit}")
    try:
        msg = json_depth.loads(data)
    except json_depth.TooDeep:
        raise TwilioError("invalid_json", "message is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise TwilioError("invalid_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        raise TwilioError("invalid_message", 'a message must be a JSON object with an "event"')
    return msg


async def _handle(call: TwilioCall, msg: dict[str, Any]) -> bool:
    """One Twilio message; False once the stream has stopped."""
    event = msg["event"]
    if event == "connected":
        return True
    if event == "start":
        start = msg.get("start")
        if not isinstance(start, dict):
            raise TwilioError("invalid_message", 'a "start" message needs a "start" object')
        fmt = start.get("mediaFormat") or {}
        if not isinstance(fmt, dict):
            raise TwilioError("invalid_message", "start.mediaFormat must be an object")
        encoding, rate = fmt.get("encoding", "audio/x-mulaw"), fmt.get("sampleRate", RATE)
        if encoding != "audio/x-mulaw" or rate != RATE or fmt.get("channels", 1) != 1:
            raise TwilioError(
                "unsupported_media_format",
                f"only audio/x-mulaw 8000 Hz mono is supported, got {encoding} {rate} Hz",
                fatal=True,
            )
        call.stream_sid = msg.get("streamSid") or start.get("streamSid")
        call.call_sid = start.get("callSid")
        params = start.get("customParameters")
        # parameter names only: their values may carry the caller's data
        log.info(
            "twilio stream %s started (call %s, parameters %s)",
            call.stream_sid,
            call.call_sid,
            sorted(params) if isinstance(params, dict) else [],
        )
        return True
    if event == "media":
        media = msg.get("media")
        if call.stream_sid is None:
            raise TwilioError("media_before_start", 'media arrived before the "start" message')
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            raise TwilioError("invalid_message", 'a "media" message needs media.payload')
        if media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return True
        try:
            pcm = ulaw_decode(b64decode_strict(media["payload"]))
        except AudioDecodeError as exc:
            raise TwilioError("invalid_audio", str(exc)) from None
        call.media_in += 1
        if pcm.size:
            try:
                await call.session.push_audio(pcm, RATE)
            except ValueError as exc:
                raise TwilioError("invalid_audio", str(exc)) from None
        return True
    if event == "mark":
        mark = msg.get("mark")
        if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
            raise TwilioError("invalid_message", 'a "mark" message needs mark.name')
        call.on_mark(mark["name"])
        return True
    if event == "dtmf":
        dtmf = msg.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str):
            raise TwilioError("invalid_message", 'a "dtmf" message needs dtmf.digit')
        try:
            await call.session.press_key(digit)
        except (ValueError, RuntimeError) as exc:  # not a key; the session has closed
            raise TwilioError("invalid_message", str(exc)) from None
        call.dtmf += 1
        return True
    if event == "stop":
        return False
    raise TwilioError("unknown_event", f"unknown event {event!r}")


def make_handler(ctx: ServerContext) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    limit = ctx.config.max_message_bytes
    agent = getattr(ctx.runtime, "config", None)  # a stand-in runtime may have none
    telephony = agent.telephony if agent is not None else TelephonyConfig()

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            max_msg_size=limit * 4, heartbeat=30, writer_limit=WRITE_BUFFER_BYTES
        )
        await ws.prepare(request)
        bound_write_buffer(request)
        try:
            live = await ctx.open_session(
                TRANSPORT,
                pace_output=True,  # real time, so that a barge-in has little to clear
                output_sample_rate=RATE,
                output_lead_s=telephony.playout_lead_ms / 1000,
            )
        except CapacityError as exc:
            # a hang-up: Twilio ends the <Stream> (and the call goes on to the next TwiML verb)
            log.warning("twilio call refused (%s): hanging up", exc.code)
            with contextlib.suppress(Exception):
                await ws.send_str(
                    json.dumps(
                        {"event": "error", "error": {"code": exc.code, "message": exc.message}}
                    )
                )
            await ws.close(code=1013, message=exc.code.encode())
            return ws
        call = TwilioCall(ctx=ctx, ws=ws, session=live.session)

        async def notify(notice: Notice) -> None:
            log.info("twilio stream %s: hanging up (%s)", call.stream_sid, notice.code)
            error = {"code": notice.code, "message": notice.message}
            await call.send({"event": "error", "streamSid": call.stream_sid, "error": error})

        async def hangup(notice: Notice) -> None:
            await ws.close(code=notice.ws_code, message=notice.code.encode())

        live.attach(notify, hangup)

        async def drop(message: str) -> None:
            await call.send_error(TwilioError("output_queue_full", message))

        await run_connection(ctx, live, ws, _pump(call), _read_loop(call, live), request, drop)
        return ws

    async def _read_loop(call: TwilioCall, live: LiveSession) -> None:
        ws = call.ws
        while not ws.closed:
            msg = await ws.receive()
            live.touch()
            if msg.type == WSMsgType.TEXT:
                try:
                    if not await _handle(call, _parse(msg.data, limit)):
                        with contextlib.suppress(Exception):
                            await call.session.end()
                        return
                except TwilioError as err:
                    await call.send_error(err)
                    if err.fatal:
                        await ws.close(code=1003, message=err.message.encode()[:120])
                        return
                except (ConnectionResetError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a fault in one message must not end the call
                    log.exception("twilio stream %s: a message failed", call.stream_sid)
                    await call.send_error(
                        TwilioError("internal_error", f"internal error: {type(exc).__name__}")
                    )
            elif msg.type == WSMsgType.BINARY:
                await call.send_error(
                    TwilioError("invalid_message", "binary messages not expected")
                )
            else:
                return

    return handler
