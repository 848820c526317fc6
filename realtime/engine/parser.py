"""Streaming split of generated text into reasoning, answer and tool calls.

Text arrives in arbitrary deltas (a marker may be cut across two of them); the parser holds back
only the few characters that could still become a marker and emits everything else at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from realtime.engine.base import TokenEvent

THINK_OPEN = ("<think>", "<|THINK_START|>")
THINK_CLOSE = ("</think>", "<|THINK_END|>")
CALL_OPEN = ("<|CALL_START|>", "<tool_call>")
CALL_CLOSE = ("<|CALL_END|>", "</tool_call>")
END_MARKERS = ("<|EOT|>", "<|im_end|>", "<|endoftext|>")


@dataclass
class _State:
    mode: str  # "answer" | "thinking" | "tool_call" | "done"
    buffer: str = ""
    tool: str = ""
    answer_started: bool = False


class ReasoningParser:
    """Feed text deltas with :meth:`feed`; collect :class:`TokenEvent` s.

    ``in_thinking``: the prompt already opened the reasoning block (Step-Audio's generation
    prompt ends in ``<think>\\n``). Leading whitespace of the answer is dropped.
    """

    def __init__(self, in_thinking: bool = False) -> None:
        self._s = _State(mode="thinking" if in_thinking else "answer")
        self._markers = THINK_OPEN + THINK_CLOSE + CALL_OPEN + CALL_CLOSE + END_MARKERS

    @property
    def done(self) -> bool:
        return self._s.mode == "done"

    @property
    def mode(self) -> str:
        return self._s.mode

    def feed(self, delta: str) -> list[TokenEvent]:
        if self._s.mode == "done":
            return []
        self._s.buffer += delta
        return list(self._drain(final=False))

    def close(self) -> list[TokenEvent]:
        """End of generation: flush what was held back (an unfinished marker is text)."""
        out = list(self._drain(final=True))
        if self._s.mode == "tool_call" and self._s.tool:
            out.append(TokenEvent("tool_call", self._s.tool))
            self._s.tool = ""
        return out

    def _emit(self, text: str) -> Iterator[TokenEvent]:
        s = self._s
        if not text:
            return
        if s.mode == "thinking":
            yield TokenEvent("thinking", text)
        elif s.mode == "tool_call":
            s.tool += text
        elif s.mode == "answer":
            if not s.answer_started:
                text = text.lstrip()
                if not text:
                    return
                s.answer_started = True
            yield TokenEvent("answer", text)

    def _drain(self, final: bool) -> Iterator[TokenEvent]:
        s = self._s
        while s.buffer and s.mode != "done":
            idx = s.buffer.find("<")
            if idx < 0:
                yield from self._emit(s.buffer)
                s.buffer = ""
                return
            if idx > 0:
                yield from self._emit(s.buffer[:idx])
                s.buffer = s.buffer[idx:]
            marker = next((m for m in self._markers if s.buffer.startswith(m)), None)
            if marker is None:
                could_grow = any(m.startswith(s.buffer) for m in self._markers)
                if could_grow and not final:
                    return  # wait for the rest of a possible marker
                yield from self._emit("<")
                s.buffer = s.buffer[1:]
                continue
            s.buffer = s.buffer[len(marker) :]
            yield from self._on_marker(marker)

    def _on_marker(self, marker: str) -> Iterator[TokenEvent]:
        s = self._s
        if marker in END_MARKERS:
            if s.mode == "tool_call" and s.tool:
                yield TokenEvent("tool_call", s.tool)
                s.tool = ""
            s.mode = "done"
            s.buffer = ""
        elif marker in THINK_OPEN:
            s.mode = "thinking"
        elif marker in THINK_CLOSE:
            s.mode = "answer"
        elif marker in CALL_OPEN:
            s.mode = "tool_call"
            s.tool = ""
        elif marker in CALL_CLOSE:
            yield TokenEvent("tool_call", s.tool.strip())
            s.tool = ""
            s.mode = "answer"
