"""WebRTC for the browser page: ``POST /offer`` signalling, Opus audio both ways through
aiortc, and the session's events as JSON on a data channel.

One ``PeerState`` per browser. The inbound track reader feeds the session; the session's
``OutputAudio`` (paced in real time by the session) goes into ``SessionAudioTrack``, which
aiortc pulls every 20 ms; a barge-in empties it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from realtime.audio import StreamResampler, av_frame_to_array
from realtime.frames import (
    EndFrame,
    Interruption,
    OutputAudio,
    ToolCall,
    TurnMetrics,
    frame_to_event,
)
from realtime.server import json_depth
from realtime.server import realtime_protocol as rp
from realtime.server.auth import principal
from realtime.server.bridge import (
    AgentSession,
    CapacityError,
    LiveSession,
    Notice,
    ServerContext,
    cancel_task,
)

log = logging.getLogger(__name__)

RTC_RATE = 48000
FRAME_MS = 20
CONNECT_TIMEOUT_S = 30.0


class SessionAudioTrack(MediaStreamTrack):
    """Outgoing audio: 20 ms int16 mono frames at 48 kHz, paced by sample count.

    ``pts`` counts samples (``time_base`` 1/48000); ``recv`` sleeps until the wall time of
    the next frame, so aiortc sends in real time. Silence fills the gaps between answers.
    """

    kind = "audio"

    def __init__(self, sample_rate: int = RTC_RATE, frame_ms: int = FRAME_MS) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate * frame_ms // 1000
        self._time_base = fractions.Fraction(1, sample_rate)
        self._buffer = bytearray()
        self._pts = 0
        self._start: float | None = None
        self.samples_sent = 0  # audio (not silence) samples handed to aiortc

    def feed(self, pcm: np.ndarray) -> None:
        self._buffer.extend(np.asarray(pcm, dtype="<i2").tobytes())

    def clear(self) -> None:
        self._buffer.clear()

    @property
    def buffered_s(self) -> float:
        return len(self._buffer) / 2 / self.sample_rate

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            wait = self._start + self._pts / self.sample_rate - now
            if wait > 0:
                await asyncio.sleep(wait)
        n = self.samples_per_frame
        take = min(len(self._buffer), 2 * n)
        data = bytes(self._buffer[:take])
        del self._buffer[:take]
        self.samples_sent += take // 2
        frame = AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(data + bytes(2 * n - take))
        frame.pts = self._pts
        frame.sample_rate = self.sample_rate
        frame.time_base = self._time_base
        self._pts += n
        return frame


@dataclass
class PeerState:
    ctx: ServerContext
    pc: RTCPeerConnection
    out_track: SessionAudioTrack = field(default_factory=SessionAudioTrack)
    session: AgentSession | None = None
    live: LiveSession | None = None
    inbound: MediaStreamTrack | None = None
    channel: RTCDataChannel | None = None
    pending: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    closed: bool = False
    calls: dict[str, str] = field(default_factory=dict)  # the model's tool calls: id -> name

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send_event(self, event: dict[str, Any]) -> None:
        text = json.dumps(event)
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            ch.send(text)
        elif len(self.pending) < 256:
            self.pending.append(text)

    def flush_pending(self) -> None:
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return
        for text in self.pending:
            ch.send(text)
        self.pending.clear()

    async def notify(self, notice: Notice) -> None:
        """A closing event on the data channel, given up to a second to leave."""
        self.send_event({"event": "error", "code": notice.code, "message": notice.message})
        ch = self.channel
        for _ in range(20):
            if ch is None or ch.readyState != "open" or not ch.bufferedAmount:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # what the channel handed to SCTP is sent on its next tick

    async def hangup(self, notice: Notice) -> None:
        await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                await cancel_task(task)
        self.out_track.stop()
        if self.live is not None:
            await self.ctx.close_session(self.live)
        with contextlib.suppress(Exception):
            await self.pc.close()


async def _read_inbound(state: PeerState, track: MediaStreamTrack, session: AgentSession) -> None:
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            break
        if state.live is not None:
            state.live.touch()  # a packet, silent or not, is input: idle means none arrive
        try:
            await session.push_audio(av_frame_to_array(frame), frame.sample_rate)
        except ValueError as exc:
            state.send_event({"event": "error", "code": "bad_audio", "message": str(exc)})
    with contextlib.suppress(Exception):
        await session.end()


async def _pump_frames(state: PeerState, session: AgentSession) -> None:
    resample = StreamResampler(state.out_track.sample_rate, dtype=np.int16)
    async for frame in session.frames():
        if isinstance(frame, OutputAudio):
            state.out_track.feed(resample(frame.pcm, frame.sample_rate))
            continue
        if isinstance(frame, Interruption):
            state.out_track.clear()
        elif isinstance(frame, TurnMetrics):
            state.ctx.metrics.observe_turn("webrtc", frame)
        elif isinstance(frame, ToolCall):
            state.calls[frame.call_id] = frame.name
        event = frame_to_event(frame)
        if event is not None:
            state.send_event(event)
        if isinstance(frame, EndFrame):
            break


async def _on_message(state: PeerState, message: object) -> None:
    """Commands from the page: ``{"type": "cancel"}``, ``{"type": "text", "text": ...}``,
    ``{"type": "tools", "tools": [...], "tool_choice": ...}`` (as in ``session.update``) and
    ``{"type": "tool_result", "call_id": ..., "output": ...}`` (then ``text`` or ``respond``)."""
    session = state.session
    if state.live is not None:
        state.live.touch()
    limit = state.ctx.config.max_message_bytes
    size = len(message) if isinstance(message, (str, bytes)) else 0
    if size > limit:
        state.ctx.metrics.client_errors.labels("webrtc", "message_too_large").inc()
        state.send_event(
            {
                "event": "error",
                "code": "message_too_large",
                "message": f"a message of {size} bytes exceeds max_message_bytes ({limit})",
            }
        )
        return
    try:
        if not isinstance(message, str):
            raise ValueError("data channel messages must be JSON text")
        cmd = json_depth.loads(message)
        if not isinstance(cmd, dict):
            raise ValueError("a command must be a JSON object")
        kind = cmd.get("type")
        if session is None:
            raise ValueError("no session yet")
        if kind == "cancel":
            await session.cancel()
        elif kind == "text" and isinstance(cmd.get("text"), str) and cmd["text"].strip():
            await session.respond(cmd["text"])
        elif kind == "tools":
            tools = rp.parse_tools(cmd.get("tools"), "tools")
            choice = rp.parse_tool_choice(cmd.get("tool_choice", "auto"), tools, "tool_choice")
            session.update(tools=tools, tool_choice=choice)
        elif kind == "tool_result":
            call_id, output = cmd.get("call_id"), cmd.get("output")
            if not isinstance(call_id, str) or call_id not in state.calls:
                raise ValueError(f"call_id {call_id!r} is not a tool call of this session")
            if not isinstance(output, str):
                raise ValueError("output must be a string")
            session.add_tool_result(call_id, state.calls[call_id], output)
        elif kind == "respond":
            await session.respond()
        else:
            raise ValueError(
                f"unknown command {kind!r} "
                "(expected 'cancel', 'text', 'tools', 'tool_result' or 'respond')"
            )
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        message = str(exc) if isinstance(exc, ValueError) else "message is nested too deeply"
        state.send_event({"event": "error", "code": "bad_command", "message": message})


def _bad_request(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status)


async def _parse_offer(request: web.Request, limit: int) -> RTCSessionDescription:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    body = await request.read()
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    try:
        offer = json_depth.loads(body.decode())
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, too deep (json_depth.TooDeep)
        raise ValueError('the body must be JSON: {"sdp": "...", "type": "offer"}') from None
    if not isinstance(offer, dict) or not isinstance(offer.get("sdp"), str):
        raise ValueError('the body must be a JSON object {"sdp": "...", "type": "offer"}')
    if offer.get("type") != "offer":
        raise ValueError(f'"type" must be "offer", got {offer.get("type")!r}')
    sdp: str = offer["sdp"]
    if not sdp.lstrip().startswith("v=0"):
        raise ValueError("the sdp is not a session description (it must start with v=0)")
    if "m=audio" not in sdp:
        raise ValueError("the offer has no audio section (m=audio): add a microphone track")
    return RTCSessionDescription(sdp=sdp, type="offer")


def _refused(exc: CapacityError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


def make_offer_handler(ctx: ServerContext) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def offer(request: web.Request) -> web.Response:
        key = principal(request)
        try:
            ctx.admit("webrtc", key)  # before any SDP work; open_session checks again
        except CapacityError as exc:
            return _refused(exc)
        try:
            description = await _parse_offer(request, ctx.config.max_message_bytes)
        except web.HTTPRequestEntityTooLarge:
            ctx.metrics.client_errors.labels("webrtc", "too_large").inc()
            return _bad_request(
                f"the offer is larger than max_message_bytes ({ctx.config.max_message_bytes})", 413
            )
        except ValueError as exc:
            ctx.metrics.client_errors.labels("webrtc", "bad_offer").inc()
            return _bad_request(str(exc))

        state = PeerState(ctx=ctx, pc=RTCPeerConnection())
        pc = state.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and state.inbound is None:
                state.inbound = track

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            state.channel = channel
            channel.on("open", state.flush_pending)
            state.flush_pending()

            @channel.on("message")
            def on_message(message: object) -> None:
                state.spawn(_on_message(state, message))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await state.close()

        try:
            await pc.setRemoteDescription(description)
            if state.inbound is None:
                raise ValueError("the offer carries no audio track the server can receive")
            pc.addTrack(state.out_track)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:  # aiortc raises many kinds on a malformed SDP
            await state.close()
            ctx.metrics.client_errors.labels("webrtc", "bad_sdp").inc()
            return _bad_request(f"invalid SDP offer: {exc or type(exc).__name__}")

        try:
            state.live = await ctx.open_session(
                "webrtc", pace_output=True, key=key, output_sample_rate=RTC_RATE
            )
        except CapacityError as exc:
            await state.close()
            return _refused(exc)
        state.session = state.live.session
        state.live.attach(state.notify, state.hangup)
        state.spawn(_pump_frames(state, state.session))
        state.spawn(_read_inbound(state, state.inbound, state.session))
        state.spawn(_watchdog(state))
        local = pc.localDescription
        return web.json_response({"sdp": local.sdp, "type": local.type})

    return offer


async def _watchdog(state: PeerState) -> None:
    """Close a peer that never connects (a client that posted an offer and left)."""
    await asyncio.sleep(CONNECT_TIMEOUT_S)
    if state.pc.connectionState != "connected":
        sid = state.live.id if state.live is not None else "-"
        log.info("webrtc session %s: no connection within %.0f s; closing", sid, CONNECT_TIMEOUT_S)
        await state.close()
