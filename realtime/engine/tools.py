"""Tools (function calling), engine-neutral: what a client declares, what the model calls, what
comes back.

``ToolSpec`` is one declared function (name, description, JSON-schema parameters), as the
OpenAI Realtime and Chat Completions APIs declare them; ``ToolChoice`` says whether the model
may, must or must not call one (``"auto"``, ``"required"``, ``"none"``, or one tool's name).
An engine gets both through ``EngineSession.set_tools`` and puts them in its prompt in its own
model's format. What the model writes between its call markers (see
:mod:`realtime.engine.parser`) is read by :func:`parse_tool_call`, which knows the payloads of
the formats the engines use:

- Step-Audio 2: ``function\\n{name}\\n{json arguments}``;
- Hermes / Qwen / SmolLM convention: ``{"name": ..., "arguments": {...}}``;
- a bare ``{name}\\n{json arguments}`` or ``{name}{json arguments}``.

A ``ToolResult`` (the client's ``function_call_output``) travels to the engine with the turn it
answers (``UserTurn.tool_results``); the engine writes it into its history in the model's
tool-result role.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

AUTO, NONE, REQUIRED = "auto", "none", "required"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        """The Chat Completions form ``{"type": "function", "function": {...}}`` (what chat
        templates and OpenAI-compatible servers take)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def to_realtime(self) -> dict[str, Any]:
        """The Realtime API form ``{"type": "function", "name": ..., ...}``."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        }


# "auto" | "none" | "required" | the name of one declared tool (the model must call that one)
ToolChoice = str


@dataclass(frozen=True)
class ToolResult:
    """The output of a call the model made, as the client returned it."""

    call_id: str
    name: str
    output: str


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text (normalised: compact, parseable)


class ToolCallError(ValueError):
    """The model's call payload is not a call to a declared tool with JSON-object arguments."""


def tools_json(tools: tuple[ToolSpec, ...] | list[ToolSpec]) -> str:
    """The declared tools as a JSON list in the Chat Completions form (for prompts)."""
    return json.dumps([t.to_openai() for t in tools], ensure_ascii=False)


def forced_name(choice: ToolChoice) -> str | None:
    """The tool a choice forces, if it names one."""
    return None if choice in (AUTO, NONE, REQUIRED) else choice


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _arguments(value: Any) -> str:
    if isinstance(value, str):  # arguments given as a JSON string (OpenAI style)
        parsed = _json_object(value.strip() or "{}")
        if parsed is None:
            raise ToolCallError(f"the arguments are not a JSON object: {value[:200]!r}")
        value = parsed
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ToolCallError(f"the arguments are not a JSON object: {value!r}"[:240])
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _one_call(obj: dict[str, Any], text: str) -> ParsedCall:
    """``{"name": ..., "arguments": {...}}`` (or ``"parameters"``)."""
    name = obj.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolCallError(f"the call has no valid 'name': {text[:200]!r}")
    return ParsedCall(name, _arguments(obj.get("arguments", obj.get("parameters"))))


def parse_tool_calls(payload: str) -> list[ParsedCall]:
    """The calls in the text between one pair of call markers (usually one; a JSON list may
    hold several)."""
    text = payload.strip()
    try:  # the leading JSON value; what follows it (a call left unclosed) is not the call's
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return [_one_call(value, text)]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_one_call(v, text) for v in value]
    if text.startswith("function"):  # Step-Audio 2: function\n{name}\n{arguments}
        text = text[len("function") :].lstrip()
    brace = text.find("{")
    name = (text if brace < 0 else text[:brace]).strip()
    if not NAME_RE.match(name):
        raise ToolCallError(f"cannot read a tool name in the call {payload.strip()[:200]!r}")
    args = text[brace:] if brace >= 0 else "{}"
    return [ParsedCall(name, _arguments(args.strip()))]


def validate_tool(spec: Any, param: str) -> ToolSpec:
    """One tool of a client's list (Realtime form, or the Chat Completions form with a
    ``function`` object) as a ``ToolSpec``; ``ValueError`` says what is wrong and where."""
    if not isinstance(spec, dict):
        raise ValueError(f"{param} must be an object")
    if spec.get("type", "function") != "function":
        raise ValueError(f"{param}.type must be 'function', got {spec.get('type')!r}")
    body = spec.get("function") if isinstance(spec.get("function"), dict) else spec
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"{param}.name must be 1 to 64 letters, digits, '_', '-' or '.', got {name!r}"
        )
    description = body.get("description") or ""
    if not isinstance(description, str):
        raise ValueError(f"{param}.description must be a string")
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ValueError(f"{param}.parameters must be a JSON schema object")
    if parameters.get("type", "object") != "object":
        raise ValueError(f"{param}.parameters.type must be 'object' (the arguments are an object)")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as exc:
        raise ValueError(f"{param}.parameters is not a valid JSON schema: {exc.message}") from None
    return ToolSpec(name, description, parameters)


def argument_errors(spec: ToolSpec, arguments: str) -> list[str]:
    """What is wrong with ``arguments`` (JSON text) for ``spec``'s schema; [] when valid."""
    from jsonschema import Draft202012Validator

    obj = _json_object(arguments)
    if obj is None:
        return ["the arguments are not a JSON object"]
    return [e.message for e in Draft202012Validator(spec.parameters).iter_errors(obj)]
