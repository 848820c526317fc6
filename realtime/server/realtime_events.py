"""Client events of the Realtime API -> session calls (``session.update``,
``input_audio_buffer.*``, ``conversation.item.*``, ``response.*``), with a clear error for a
malformed, unknown or out-of-place event."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any

from realtime.config import VADConfig
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
        # a malformed body is refused at once, before any wait for a transcript
        text_only = _response_text_only(event.get("response"), conn.settings.text_only)
        turn = conn.awaiting_transcript
        if turn is not None and not conn.pending_user_text:
            # the committed audio is still being transcribed: answer it once it is
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(turn.transcribed.wait(), TRANSCRIPT_WAIT_S)
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
        if not isinstance(item_id, str) or conn.items.get(item_id) != "assistant":
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
        if not isinstance(item_id, str) or item_id not in conn.items:
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


def parse_message(data: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise ClientError(
            f"message of {len(data)} bytes exceeds the limit of {limit} bytes; "
            "send audio in smaller appends",
            code="message_too_large",
        )
    try:
        event = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise ClientError(f"message is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise ClientError("message is nested too deeply", code="invalid_json") from None
    if not isinstance(event, dict):
        raise ClientError("an event must be a JSON object", code="invalid_event")
    return event
