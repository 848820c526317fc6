"""Chat prompt of Step-Audio 2 / R1 as token ids, with the positions the audio goes to.

    <|BOT|>system\n{system prompt}<|EOT|>
    <|BOT|>tool_json_schemas\n[{"type": "function", "function": {...}}, ...]<|EOT|>   (if tools)
    <|BOT|>human\n{text and audio parts}<|EOT|>
    <|BOT|>assistant\n<think>\n{reasoning}\n</think>\n{answer}<|EOT|>     (earlier turns)
    <|BOT|>assistant\n...{answer}<tool_call>function\n{name}\n{json args}</tool_call><|EOT|>
    <|BOT|>input\n{the tool's output}<|EOT|>                             (a tool result)
    <|BOT|>human\n<audio_start><audio_patch>x N<audio_end><|EOT|>        (this turn)
    <|BOT|>assistant\n<think>\n                                         (generation prompt)

Each audio piece (at most 25 s) is ``<audio_start>`` + one ``<audio_patch>`` per 12.5 Hz
embedding + ``<audio_end>``; the embeddings replace the patches. Every part is tokenized on its
own, so the ids of a prompt are the concatenation of the ids of its messages and parts: a
prefix that was pre-filled while the user spoke stays valid when more audio arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from realtime.models.step_audio.lengths import chunk_spans, embeddings_for_samples
from realtime.models.step_audio.tokens import SpecialTokens, TextTokenizer

Role = Literal["system", "human", "assistant", "tool_json_schemas", "input"]
TOOLS_ROLE: Role = "tool_json_schemas"  # the declared functions, as a JSON list
TOOL_RESULT_ROLE: Role = "input"  # what a called tool returned
GENERATION_ROLE = "assistant"
THINK_PREFIX = "<think>\n"


@dataclass(frozen=True)
class AudioSlot:
    """One encoded audio piece: ``n_embeddings`` <audio_patch> tokens between start and end."""

    n_embeddings: int


Part = str | AudioSlot


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...] = ()
    eot: bool = True  # False leaves the turn open (a prefix the model continues)

    @staticmethod
    def text(role: Role, text: str) -> Message:
        return Message(role, (text,))


def audio_slots(n_samples: int) -> tuple[AudioSlot, ...]:
    """The audio parts of ``n_samples`` of 16 kHz audio (one per 25 s piece)."""
    return tuple(AudioSlot(embeddings_for_samples(e - s)) for s, e in chunk_spans(n_samples))


def assistant_text(answer: str, reasoning: str = "") -> str:
    """An earlier reply as history: the reasoning block (empty by default) then the answer
    (with the ``<tool_call>...</tool_call>`` blocks of the calls it made)."""
    return f"{THINK_PREFIX}{reasoning}\n</think>\n{answer}"


@dataclass
class Prompt:
    ids: list[int] = field(default_factory=list)
    audio_positions: list[int] = field(default_factory=list)  # indices of <audio_patch> in ids
    audio_spans: list[tuple[int, int]] = field(default_factory=list)  # (first index, count)

    @property
    def n_audio(self) -> int:
        return len(self.audio_positions)

    def extend(self, other: Prompt) -> None:
        base = len(self.ids)
        self.ids.extend(other.ids)
        self.audio_positions.extend(base + p for p in other.audio_positions)
        self.audio_spans.extend((base + s, n) for s, n in other.audio_spans)


class PromptBuilder:
    def __init__(self, tokenizer: TextTokenizer, special: SpecialTokens) -> None:
        self.tok = tokenizer
        self.sp = special

    def audio(self, slot: AudioSlot) -> Prompt:
        p = Prompt()
        p.ids.append(self.sp.audio_start)
        start = len(p.ids)
        p.ids.extend([self.sp.audio_patch] * slot.n_embeddings)
        p.audio_positions.extend(range(start, start + slot.n_embeddings))
        p.audio_spans.append((start, slot.n_embeddings))
        p.ids.append(self.sp.audio_end)
        return p

    def open_turn(self, role: Role) -> Prompt:
        return Prompt(ids=[self.sp.bot, *self.tok.encode(f"{role}\n")])

    def message(self, m: Message) -> Prompt:
        p = self.open_turn(m.role)
        for part in m.parts:
            if isinstance(part, AudioSlot):
                p.extend(self.audio(part))
            elif part:
                p.extend(Prompt(ids=self.tok.encode(part)))
        if m.eot:
            p.ids.append(self.sp.eot)
        return p

    def generation_prompt(self) -> Prompt:
        """``<|BOT|>assistant\\n<think>\\n``: the reply starts inside the reasoning block."""
        p = self.open_turn(GENERATION_ROLE)
        p.ids.extend(self.tok.encode(THINK_PREFIX))
        return p

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> Prompt:
        p = Prompt()
        for m in messages:
            p.extend(self.message(m))
        if add_generation_prompt:
            p.extend(self.generation_prompt())
        return p


@dataclass
class Turn:
    """One finished exchange of the history: what the user said, what was answered."""

    user: Message
    answer: str  # as history renders it (tool calls included)
    reasoning: str = ""
    inputs: tuple[Message, ...] = ()  # tool results the turn returned, before ``user``


@dataclass
class Conversation:
    """System prompt plus history; renders the prompt of the next turn."""

    system_prompt: str = ""
    turns: list[Turn] = field(default_factory=list)
    max_turns: int = 0  # keep at most this many earlier turns (0 = all)
    tools: str = ""  # the declared tools as a JSON list ("" = none)

    def messages(self, user: Message | None = None) -> list[Message]:
        out: list[Message] = []
        if self.system_prompt:
            out.append(Message.text("system", self.system_prompt))
        if self.tools:
            out.append(Message.text(TOOLS_ROLE, self.tools))
        turns = self.turns[-self.max_turns :] if self.max_turns else self.turns
        for t in turns:
            out.extend(t.inputs)
            out.append(t.user)
            out.append(Message.text("assistant", assistant_text(t.answer, t.reasoning)))
        if user is not None:
            out.append(user)
        return out

    def render(self, builder: PromptBuilder, user: Message) -> Prompt:
        return builder.render(self.messages(user), add_generation_prompt=True)
