"""The engine interface every reply backend implements.

An *engine* owns the model (loaded once, shared by all sessions). Each conversation gets an
``EngineSession`` that owns the per-session state: history, KV-cache slots, positions and
sampling settings. All methods of both are **blocking** and are only ever called from the
engine's worker thread (``realtime.engine.worker.EngineWorker``), never from the event loop.

A turn goes like this (the pipeline drives it):

    session.listen(pcm)        # 0..n times while the user speaks (audio engines pre-fill here)
    session.respond(turn, cancel) -> iterator of TokenEvent   # thinking, answer, tool calls
    session.commit(turn, spoken_answer, interrupted)          # what was really said goes to history
or  session.discard()                                         # a false start: forget the partial turn

``respond`` may be called *speculatively* (the user paused but may go on). If it is cancelled
before ``commit``, the engine rolls back only what ``respond`` added (generated tokens), keeps
the audio heard so far, and further ``listen`` calls continue the same turn; the next
``respond`` answers the longer utterance.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from realtime.config import SamplingConfig
from realtime.engine.tools import ToolChoice, ToolResult, ToolSpec

TokenKind = Literal["thinking", "answer", "tool_call", "speech_tokens"]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    kind: TokenKind
    text: str = ""
    token_ids: tuple[int, ...] = ()  # raw ids (speech tokens for a speech head)


@dataclass
class UserTurn:
    """What the user said in one turn, as far as the engine needs it: the transcript (text
    engines answer it). Audio engines answer the audio they were given through ``listen``."""

    text: str = ""
    # outputs of the tool calls the last answer made, returned by the client: the engine
    # writes them into its history (in its model's tool-result role) before ``text``
    tool_results: tuple[ToolResult, ...] = ()


@dataclass
class TurnStats:
    """Filled in by ``respond`` as it runs (wall times, time.monotonic())."""

    prefill_tokens: int = 0
    generated_tokens: int = 0
    thinking_tokens: int = 0
    wall_prefill_done: float | None = None
    wall_first_token: float | None = None
    wall_first_answer_token: float | None = None


class EngineBusy(Exception):
    """The engine has no room for another session now (every cache slot is taken): the
    caller should be told the service is busy, and may try again later."""


class CancelToken:
    """Set from any thread; the engine checks it once per decoding step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@runtime_checkable
class EngineSession(Protocol):
    stats: TurnStats

    def listen(self, pcm16k: np.ndarray) -> None:
        """Audio of the current user turn as it arrives. Text engines may ignore it."""

    def respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        """Generate the reply to ``turn``. Stops at the end-of-turn token, at
        ``max_new_tokens`` or within one decoding step of ``cancel``. A ``None`` item carries
        no event: it marks a step, where the worker may run other work."""
        ...

    def commit(self, turn: UserTurn, spoken_answer: str, interrupted: bool) -> None:
        """Record the turn in the history with the answer as the user really heard it."""

    def discard(self) -> None:
        """Forget the current (partial) turn: pre-filled audio, speculative work."""

    def set_instructions(self, system_prompt: str) -> None:
        """A new system prompt, in force from the next turn on."""

    def revise(self, turn: int, answer: str | None, forget_user: bool, forget_answer: bool) -> None:
        """Change committed turn number ``turn`` (0 = this session's first) of the history, in
        force from the next turn on: its answer becomes ``answer`` (the part that was heard),
        or its user part or answer is forgotten. A turn already dropped from the history
        (``history_turns``) is left alone."""

    def set_tools(self, tools: tuple[ToolSpec, ...], choice: ToolChoice) -> None:
        """The functions the model may call, and whether it must (``choice``), from the next
        turn on. The tool calls an answer makes come out of ``respond`` as ``tool_call``
        events (the payload between the model's call markers) and are kept in the history by
        ``commit``."""

    def close(self) -> None:
        """Free everything this session holds (cache slots)."""


@runtime_checkable
class Engine(Protocol):
    name: str
    input_kind: Literal["text", "audio"]
    # True when sessions keep all their decoding state apart, so that the worker may advance
    # several sessions' answers step by step in turn (see realtime.engine.worker)
    interleaved_responses: bool

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> EngineSession: ...

    def warmup(self) -> None:
        """Run once at start so that the first real turn pays no one-off costs."""

    def close(self) -> None: ...
