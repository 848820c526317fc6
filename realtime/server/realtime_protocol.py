"""The OpenAI Realtime wire format, independent of any connection: audio formats, the
session settings a ``session.update`` may change, ids, and the JSON shapes of items,
responses and sessions in both dialects (GA, and beta for clients that send
``OpenAI-Beta: realtime=v1``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from realtime.engine.tools import AUTO, NONE, REQUIRED, ToolSpec, validate_tool
from realtime.server import codecs

# Beta clients know these events by older names; the rest are the same in both dialects.
BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "conversation.item.added": "conversation.item.created",
}
GA_ONLY = {"conversation.item.done"}

# The reasoning of a thinking model, as its own text stream; clients that don't know these
# events ignore them (the official SDK parses them leniently).
REASONING_DELTA = "response.reasoning_text.delta"
REASONING_DONE = "response.reasoning_text.done"

# OpenAI's voice names: existing clients send them by default, so they select our default.
OPENAI_VOICES = frozenset(
    {
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "onyx",
        "nova",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    }
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


class ClientError(ValueError):
    """Bad client input, answered with an ``error`` event (the connection goes on)."""

    def __init__(
        self,
        message: str,
        code: str = "invalid_value",
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind


@dataclass(frozen=True)
class AudioFormat:
    ga: str  # the GA type name
    beta: str  # the beta name
    rate: int
    decode: Callable[[bytes], np.ndarray]
    encode: Callable[[np.ndarray], bytes]

    def to_json(self, beta: bool) -> Any:
        if beta:
            return self.beta
        return {"type": self.ga, "rate": self.rate} if self.ga == "audio/pcm" else {"type": self.ga}


def _pcm_encode(pcm: np.ndarray) -> bytes:
    return np.asarray(pcm, dtype="<i2").tobytes()


PCM24 = AudioFormat("audio/pcm", "pcm16", 24000, codecs.pcm16_from_bytes, _pcm_encode)
PCMU = AudioFormat("audio/pcmu", "g711_ulaw", 8000, codecs.ulaw_decode, codecs.ulaw_encode)
PCMA = AudioFormat("audio/pcma", "g711_alaw", 8000, codecs.alaw_decode, codecs.alaw_encode)
FORMATS = {f.ga: f for f in (PCM24, PCMU, PCMA)} | {f.beta: f for f in (PCM24, PCMU, PCMA)}


def parse_format(value: Any, param: str) -> AudioFormat:
    """GA ``{"type": "audio/pcm", "rate": 24000}`` or a beta name such as ``"g711_ulaw"``."""
    if isinstance(value, str):
        name, rate = value, None
    elif isinstance(value, dict):
        name, rate = value.get("type"), value.get("rate")
        param = f"{param}.type"
    else:
        raise ClientError(f"{param} must be an object or a format name", param=param)
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ClientError(
            f"unsupported audio format {name!r}; use one of {sorted(FORMATS)}", param=param
        )
    if rate is not None and rate != fmt.rate:
        raise ClientError(
            f"{fmt.ga} is {fmt.rate} Hz; rate {rate!r} is not supported",
            param=param.replace(".type", ".rate"),
        )
    return fmt


EAGERNESS = ("low", "medium", "high", "auto")  # semantic_vad (see realtime/endpoint.py)


@dataclass(frozen=True)
class TurnDetection:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    kind: str = "server_vad"
    eagerness: str = "auto"  # semantic_vad: low | medium | high | auto

    def to_json(self) -> dict[str, Any]:
        if self.kind == "semantic_vad":
            return {
                "type": self.kind,
                "eagerness": self.eagerness,
                "create_response": self.create_response,
                "interrupt_response": self.interrupt_response,
            }
        return {
            "type": self.kind,
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        }

    @property
    def aggressiveness(self) -> int:
        """webrtcvad mode 0..3 for an OpenAI threshold in [0, 1] (0.5 -> 2)."""
        return min(3, int(self.threshold * 4))


@dataclass(frozen=True)
class Settings:
    """What ``session.update`` can change."""

    model: str
    instructions: str
    voice: str
    speed: float = 1.0
    input_format: AudioFormat = PCM24
    output_format: AudioFormat = PCM24
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    text_only: bool = False  # output_modalities ["text"]: answers are written, not spoken
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = AUTO  # auto | none | required | the name of one declared tool

    @property
    def output_modalities(self) -> list[str]:
        return ["text"] if self.text_only else ["audio"]


def parse_modalities(value: Any, param: str) -> bool:
    """``output_modalities`` (GA: ``["audio"]`` or ``["text"]``) or beta ``modalities``
    (``["text"]`` or ``["audio", "text"]``) -> text only?"""
    if not isinstance(value, list) or not value or not all(m in ("audio", "text") for m in value):
        raise ClientError(
            f'{param} must be ["audio"], ["text"] or ["audio", "text"], got {value!r}',
            param=param,
        )
    return "audio" not in value


def _number(value: Any, param: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ClientError(f"{param} must be a number from {lo} to {hi}, got {value!r}", param=param)
    return float(value)


def parse_turn_detection(
    value: Any, current: TurnDetection | None, param: str
) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClientError(f"{param} must be an object or null", param=param)
    kind = value.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ClientError(
            f"{param}.type must be 'server_vad' or 'semantic_vad' (or turn_detection null), "
            f"got {kind!r}",
            param=f"{param}.type",
        )
    td = current or TurnDetection()
    changes: dict[str, Any] = {"kind": kind}
    if "threshold" in value:
        changes["threshold"] = _number(value["threshold"], f"{param}.threshold", 0.0, 1.0)
    for key in ("prefix_padding_ms", "silence_duration_ms"):
        if key in value and value[key] is not None:
            changes[key] = int(_number(value[key], f"{param}.{key}", 0, 10000))
    if value.get("eagerness") is not None:
        if value["eagerness"] not in EAGERNESS:
            raise ClientError(
                f"{param}.eagerness must be one of {', '.join(EAGERNESS)}, "
                f"got {value['eagerness']!r}",
                param=f"{param}.eagerness",
            )
        changes["eagerness"] = value["eagerness"]
    for key in ("create_response", "interrupt_response"):
        if key in value and value[key] is not None:
            if not isinstance(value[key], bool):
                raise ClientError(f"{param}.{key} must be true or false", param=f"{param}.{key}")
            changes[key] = value[key]
    return replace(td, **changes)


def parse_tools(value: Any, param: str) -> tuple[ToolSpec, ...]:
    """``tools``: a list of ``{"type": "function", "name", "description", "parameters"}``
    (the Chat Completions form with a ``function`` object is taken too)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ClientError(f"{param} must be a list of function tools", param=param)
    tools: list[ToolSpec] = []
    for i, spec in enumerate(value):
        try:
            tool = validate_tool(spec, f"{param}[{i}]")
        except ValueError as exc:
            raise ClientError(str(exc), param=f"{param}[{i}]") from None
        if any(t.name == tool.name for t in tools):
            raise ClientError(f"{param}[{i}]: two tools are named {tool.name!r}", param=param)
        tools.append(tool)
    return tuple(tools)


def parse_tool_choice(value: Any, tools: tuple[ToolSpec, ...], param: str) -> str:
    """``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function", "name": ...}`` (also
    ``{"type": "function", "function": {"name": ...}}``) -> auto / none / required / a name."""
    if value in (AUTO, NONE, REQUIRED):
        return str(value)
    name = None
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else value.get("name")
    if not isinstance(name, str):
        raise ClientError(
            f"{param} must be 'auto', 'none', 'required' or "
            f'{{"type": "function", "name": ...}}, got {value!r}',
            param=param,
        )
    if not any(t.name == name for t in tools):
        raise ClientError(
            f"{param} names {name!r}, which is not among the tools {[t.name for t in tools]}",
            param=param,
        )
    return name


def tool_choice_json(choice: str) -> Any:
    return choice if choice in (AUTO, NONE, REQUIRED) else {"type": "function", "name": choice}


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ClientError(f"{param} must be a string", param=param)
    return value


def parse_session_update(session: Any, current: Settings, voices: set[str]) -> Settings:
    """A new ``Settings`` from a ``session.update`` body in either dialect (all or nothing)."""
    if not isinstance(session, dict):
        raise ClientError("session.update needs a 'session' object", param="session")
    s = current
    if "instructions" in session and session["instructions"] is not None:
        s = replace(s, instructions=_text(session["instructions"], "session.instructions"))
    audio = session.get("audio") or {}
    if not isinstance(audio, dict):
        raise ClientError("session.audio must be an object", param="session.audio")
    a_in = audio.get("input") or {}
    a_out = audio.get("output") or {}
    for part, value in (("input", a_in), ("output", a_out)):
        if not isinstance(value, dict):
            raise ClientError(
                f"session.audio.{part} must be an object", param=f"session.audio.{part}"
            )
    # beta: flat keys; GA: under session.audio
    if "input_audio_format" in session:
        s = replace(
            s,
            input_format=parse_format(session["input_audio_format"], "session.input_audio_format"),
        )
    if "format" in a_in:
        s = replace(s, input_format=parse_format(a_in["format"], "session.audio.input.format"))
    if "output_audio_format" in session:
        s = replace(
            s,
            output_format=parse_format(
                session["output_audio_format"], "session.output_audio_format"
            ),
        )
    if "format" in a_out:
        s = replace(s, output_format=parse_format(a_out["format"], "session.audio.output.format"))
    if "turn_detection" in session:
        s = replace(
            s,
            turn_detection=parse_turn_detection(
                session["turn_detection"], s.turn_detection, "session.turn_detection"
            ),
        )
    if "turn_detection" in a_in:
        s = replace(
            s,
            turn_detection=parse_turn_detection(
                a_in["turn_detection"], s.turn_detection, "session.audio.input.turn_detection"
            ),
        )
    for key in ("output_modalities", "modalities"):
        if session.get(key) is not None:
            s = replace(s, text_only=parse_modalities(session[key], f"session.{key}"))
    voice = a_out.get("voice", session.get("voice"))
    if isinstance(voice, dict):
        voice = voice.get("id")
    if voice is not None:
        voice = _text(voice, "session.audio.output.voice")
        if voice in voices:
            s = replace(s, voice=voice)
        elif voice not in OPENAI_VOICES:
            raise ClientError(
                f"unknown voice {voice!r}; this server has {sorted(voices)}",
                param="session.audio.output.voice",
            )
    speed = a_out.get("speed", session.get("speed"))
    if speed is not None:
        s = replace(s, speed=_number(speed, "session.audio.output.speed", 0.25, 4.0))
    if "tools" in session:
        s = replace(s, tools=parse_tools(session["tools"], "session.tools"))
    if session.get("tool_choice") is not None:
        s = replace(
            s, tool_choice=parse_tool_choice(session["tool_choice"], s.tools, "session.tool_choice")
        )
    elif s.tool_choice not in (AUTO, NONE, REQUIRED) and all(
        t.name != s.tool_choice for t in s.tools
    ):
        raise ClientError(
            f"session.tool_choice names {s.tool_choice!r}, which the new tools no longer have",
            param="session.tool_choice",
        )
    return s


def session_json(sid: str, s: Settings, beta: bool) -> dict[str, Any]:
    td = None if s.turn_detection is None else s.turn_detection.to_json()
    if beta:
        return {
            "id": sid,
            "object": "realtime.session",
            "model": s.model,
            "modalities": ["text"] if s.text_only else ["audio", "text"],
            "instructions": s.instructions,
            "voice": s.voice,
            "input_audio_format": s.input_format.beta,
            "output_audio_format": s.output_format.beta,
            "input_audio_transcription": {"model": "local-asr"},
            "turn_detection": td,
            "speed": s.speed,
            "tools": [t.to_realtime() for t in s.tools],
            "tool_choice": tool_choice_json(s.tool_choice),
            "max_response_output_tokens": "inf",
        }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": sid,
        "model": s.model,
        "output_modalities": s.output_modalities,
        "instructions": s.instructions,
        "audio": {
            "input": {
                "format": s.input_format.to_json(False),
                "transcription": {"model": "local-asr"},
                "noise_reduction": None,
                "turn_detection": td,
            },
            "output": {
                "format": s.output_format.to_json(False),
                "voice": s.voice,
                "speed": s.speed,
            },
        },
        "tools": [t.to_realtime() for t in s.tools],
        "tool_choice": tool_choice_json(s.tool_choice),
        "max_output_tokens": "inf",
    }


def user_audio_item(item_id: str, transcript: str | None, beta: bool) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_audio", "transcript": transcript}],
    }


def text_item(item_id: str, role: str, text: str, beta: bool) -> dict[str, Any]:
    kind = "input_text" if role != "assistant" else ("text" if beta else "output_text")
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": role,
        "status": "completed",
        "content": [{"type": kind, "text": text}],
    }


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "name": name,
        "call_id": call_id,
        "arguments": arguments,
    }


def function_output_item(item_id: str, call_id: str, output: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call_output",
        "status": "completed",
        "call_id": call_id,
        "output": output,
    }


def assistant_part(text: str, text_only: bool, beta: bool) -> dict[str, Any]:
    """The content part of an answer: spoken audio with its transcript, or written text."""
    if text_only:
        return {"type": "text" if beta else "output_text", "text": text}
    return {"type": "audio" if beta else "output_audio", "transcript": text}


def assistant_item(
    item_id: str, status: str, transcript: str | None, beta: bool, text_only: bool = False
) -> dict[str, Any]:
    content = [] if transcript is None else [assistant_part(transcript, text_only, beta)]
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def usage_json(engine: dict[str, int], input_ms: float, output_ms: float) -> dict[str, Any]:
    """The engine's own token counts: ``input_tokens`` it pre-filled for the turn (text, or
    audio embeddings for an audio engine), ``output_tokens`` it generated (reasoning
    included). The audio fields count 50 ms per token of the user's and the agent's speech, as
    the OpenAI API bills audio; the local pipeline bills nothing, but clients read them."""
    text_in, text_out = engine.get("input_tokens", 0), engine.get("output_tokens", 0)
    audio_in, audio_out = int(input_ms / 50), int(output_ms / 50)
    return {
        "total_tokens": text_in + audio_in + text_out + audio_out,
        "input_tokens": text_in + audio_in,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "cached_tokens": 0,
        },
        "output_token_details": {
            "text_tokens": text_out,
            "audio_tokens": audio_out,
            "reasoning_tokens": engine.get("reasoning_tokens", 0),
        },
    }
