"""Client events of the Realtime API -> session calls (``session.update``,
``input_audio_buffer.*``, ``conversation.item.*``, ``response.*``), with a clear error for a
malformed, unknown or out-of-place event."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

from realtime.config import VADConfig
from realtime.endpoint import end_of_turn_for
from realtime.server import json_depth
from realtime.server import realtime_protocol as rp
from realtime.server.codecs import AudioDecodeError, b64decode_strict
from realtime.server.realtime_connection import (
    MIN_COMMIT_MS,
    TRANSCRIPT_WAIT_S,
    InputItem,
    RealtimeConnection,
    ResponseState,
)
from realtime.server.realtime_protocol import ClientError


def apply_settings(conn: RealtimeConnection, new: rp.Settings, base_vad: VADConfig) -> None:
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
    if new.tools != old.tools or new.tool_choice != old.tool_choice:
        changes.update(tools=new.tools, tool_choice=new.tool_choice)
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
                    end_of_turn=end_of_turn_for(
                        base_vad.end_of_turn,
                        td.eagerness if td.kind == "semantic_vad" else None,
                    ),
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


async def _function_output(conn: RealtimeConnection, item: dict[str, Any]) -> None:
    """The client ran a tool the model called: its output is kept for the next response."""
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str) or call_id not in conn.calls:
        raise ClientError(
            f"item.call_id {call_id!r} is not a function call of this conversation",
            param="item.call_id",
        )
    if not isinstance(output, str):
        raise ClientError("item.output must be a string (e.g. JSON text)", param="item.output")
    conn.session.add_tool_result(call_id, conn.calls[call_id], output)
    item_id = item.get("id") if isinstance(item.get("id"), str) else rp.new_id("item")
    full = rp.function_output_item(item_id, call_id, output)
    await conn.add_item(full)
    await conn.send("conversation.item.done", item=full)


def _check_buffer(conn: RealtimeConnection, add_ms: float) -> None:
    """Manual turns (``turn_detection: null``): the audio appended since the last commit or
    clear may not pass ``server.max_input_buffer_s`` (with server VAD, ``vad.max_turn_s``
    cuts a long turn instead)."""
    limit_s = conn.ctx.config.max_input_buffer_s
    if conn.settings.turn_detection is not None or limit_s <= 0:
        return
    if conn.user.audio_ms + add_ms > limit_s * 1000:
        raise ClientError(
            f"the input audio buffer would hold {(conn.user.audio_ms + add_ms) / 1000:.1f} s, "
            f"over the limit of {limit_s:g} s (server.max_input_buffer_s); this append was "
            "dropped: commit or clear the buffer first",
            code="input_audio_buffer_full",
            param="audio",
        )


async def handle_event(
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
        _check_buffer(conn, 1000 * pcm.size / fmt.rate)
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
        apply_settings(conn, new, base_vad)
        await conn.send("session.updated", session=rp.session_json(conn.session_id, new, conn.beta))
    elif kind == "response.create":
        if conn.response is not None:
            raise ClientError(
                "a response is already in progress; cancel it or wait for response.done",
                code="conversation_already_has_active_response",
            )
        text_only = _response_text_only(event.get("response"), conn.settings.text_only)
        conn.drop_output = False
        conn.response = response = ResponseState(
            input_text=" ".join(conn.pending_user_text),
            input_ms=0.0 if conn.pending_user_text else conn.last_input_ms,
            text_only=text_only,
        )
        if text_only != conn.settings.text_only:
            s.update(speak=not text_only)  # for this response only: restored when it is done
        await conn.send("response.created", response=conn._response_json("in_progress"))
        text = " ".join(conn.pending_user_text) or None
        conn.pending_user_text.clear()
        turn = conn.awaiting_transcript if text is None else None
        # beside the reader: the events after this one are answered while it waits
        conn.spawn(_start_response(conn, response, text, turn), event.get("event_id"))
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
        if item.get("type") == "function_call_output":
            await _function_output(conn, item)
            return
        if item.get("type", "message") != "message":
            raise ClientError(
                f"item type {item.get('type')!r} is not supported "
                "(only 'message' and 'function_call_output')",
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
        if role == "user":
            conn.turn_items.append(item_id)  # part of the next turn
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
        if not isinstance(item_id, str) or conn.items.get(item_id) != "assistant":
            raise ClientError(f"no assistant item {item_id!r} to truncate", param="item_id")
        if isinstance(end_ms, bool) or not isinstance(end_ms, int) or end_ms < 0:
            raise ClientError("audio_end_ms must be a non-negative integer", param="audio_end_ms")
        turn = conn.item_turn.get(item_id)
        last = next((i for i in reversed(conn.items) if conn.items[i] == "assistant"), None)
        heard: str | None = None
        if turn is not None:
            heard = s.truncate(end_ms, turn[0])
        elif item_id == last and (conn.response is None or conn.response.item_id != item_id):
            heard = s.truncate(end_ms)  # the last answer, done but not yet bound to its turn
        if heard is not None:
            _set_transcript(conn, item_id, heard)
        await conn.send(
            "conversation.item.truncated",
            item_id=item_id,
            content_index=event.get("content_index", 0),
            audio_end_ms=end_ms,
        )
    elif kind == "conversation.item.retrieve":
        item_id = event.get("item_id")
        if item_id not in conn.items or item_id not in conn.item_json:
            raise ClientError(f"no item {item_id!r} in the conversation", param="item_id")
        await conn.send("conversation.item.retrieved", item=conn.item_json[item_id])
    elif kind == "conversation.item.delete":
        item_id = event.get("item_id")
        if not isinstance(item_id, str) or item_id not in conn.items:
            raise ClientError(f"no item {item_id!r} in the conversation", param="item_id")
        if conn.response is not None and conn.response.item_id == item_id:
            raise ClientError(
                "the item's response is in progress; cancel it first (response.cancel)",
                param="item_id",
            )
        turn = conn.item_turn.pop(item_id, None)
        if turn is not None:  # the engine forgets it too
            with contextlib.suppress(KeyError):  # the turn left the history meanwhile
                s.forget(turn[0], user=turn[1] == "user", answer=turn[1] == "assistant")
        conn.items.pop(item_id)
        full = conn.item_json.pop(item_id, None) or {}
        if item_id in conn.turn_items:  # its turn has not been answered yet
            conn.turn_items.remove(item_id)
            text = _item_text(full)
            if text in conn.pending_user_text:  # typed, not yet sent to the session
                conn.pending_user_text.remove(text)
        await conn.send("conversation.item.deleted", item_id=item_id)
    elif isinstance(kind, str):
        raise ClientError(f"unknown event type {kind!r}", code="unknown_event", param="type")
    else:
        raise ClientError("every event needs a string 'type'", code="invalid_event", param="type")


def _item_text(item: dict[str, Any]) -> str | None:
    for p in item.get("content") or []:
        if isinstance(p, dict) and isinstance(p.get("text"), str):
            return p["text"]
    return None


def _set_transcript(conn: RealtimeConnection, item_id: str, text: str) -> None:
    """A truncated answer's item keeps only the words heard (conversation.item.retrieve)."""
    item = conn.item_json.get(item_id)
    if item is None:
        return
    parts = [dict(p) for p in item.get("content") or []]
    for p in parts:
        if "transcript" in p:
            p["transcript"] = text
        elif "text" in p:
            p["text"] = text
    conn.item_json[item_id] = {**item, "content": parts}


async def _start_response(
    conn: RealtimeConnection,
    response: ResponseState,
    text: str | None,
    turn: InputItem | None,
) -> None:
    """Answer once the committed audio is transcribed (at most ``TRANSCRIPT_WAIT_S``), unless
    the response was cancelled meanwhile."""
    if turn is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(turn.transcribed.wait(), TRANSCRIPT_WAIT_S)
    if conn.response is not response:
        return  # cancelled (or ended) while it waited
    try:
        await conn.session.respond(text)
    except ValueError as exc:
        if conn.response is response:
            await conn.finish_response("failed", "error")
        raise ClientError(f"cannot respond: {exc}", code="response_failed") from None


def parse_message(data: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise ClientError(
            f"message of {len(data)} bytes exceeds the limit of {limit} bytes; "
            "send audio in smaller appends",
            code="message_too_large",
        )
    try:
        event = json_depth.loads(data)
    except json_depth.TooDeep:
        raise ClientError("message is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise ClientError(f"message is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(event, dict):
        raise ClientError("an event must be a JSON object", code="invalid_event")
    return event
