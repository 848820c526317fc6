"""Answering: one ``respond``'s lanes on the engine's shared decode step.

With a think budget B > 0 and a free slot, two lanes run in the same batched step: the
*formulation* lane continues the reasoning block on the session's slot; the *articulation* lane
is a fork of the same prefix (cache rows copied) that closes the reasoning at once and speaks.
At each sentence end of the answer, reasoning written since the last hand-over (at least
``refresh_tokens`` tokens) is inserted into the articulation lane as a reasoning block and
speaking goes on from it. The formulation lane stops after B reasoning tokens or when it closes
its block; speech never waits for it. B = 0 is one lane that answers after an empty reasoning
block; without a free slot, one lane thinks up to B tokens, then ``</think>`` is forced
(think-first).

Each lane's text is decoded incrementally (:meth:`TextTokenizer.stream`) and goes through its own
:class:`ReasoningParser`; the formulation lane only yields ``thinking`` events, the articulation
lane ``answer`` events (and ``thinking`` ones if it opens a block itself). A lane stops at any of
the checkpoint's stop ids (:attr:`SpecialTokens.stop_ids`), whose text is never emitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken, EngineBusy, TokenEvent, TurnStats
from realtime.engine.parser import ReasoningParser
from realtime.engine.step_audio.core import THINK_CLOSE_TEXT, StepAudioCore
from realtime.models.decode import Lane, LaneSampling
from realtime.models.kv_pages import KVPoolFull
from realtime.models.step_audio.tokens import TextStream
from realtime.text import ends_sentence

log = logging.getLogger(__name__)


Role = Literal["formulation", "articulation"]
Fork = tuple[int, torch.Tensor]  # the speaking fork's slot, and its last position's logits
TokenHook = Callable[[Role, int, float], None]


@dataclass
class LaneState:
    role: Role
    lane: Lane  # its row on the engine's runner (shared with other sessions' lanes)
    parser: ReasoningParser
    stream: TextStream  # incremental detokenisation of ``ids``
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the decoded text of ``ids``
    done: bool = False
    solo: bool = False  # think-first: one lane that reasons, then answers
    handed: int = 0  # formulation: reasoning tokens already given to the speaker
    handover_at: int = -1  # articulation: its token count at the last hand-over
    forced: int = 0  # articulation with engine.forced_answer: forced tokens fed so far
    force_due: bool = True  # ... and its next input is not forced yet


class Answer:
    """The lanes of one answer, from the end of the user turn to the last token."""

    def __init__(
        self,
        engine: StepAudioCore,
        slot: int,
        sampling: SamplingConfig,
        stats: TurnStats,
        on_token: TokenHook | None = None,
    ) -> None:
        self.engine = engine
        self.slot = slot
        self.sampling = sampling
        self.stats = stats
        self.on_token = on_token
        self.budget = max(0, sampling.think_budget)
        self.lanes: list[LaneState] = []  # still decoding
        self.handovers = 0  # reasoning blocks handed to the speaking lane
        self.released = False
        self._on_runner: list[Lane] = []
        self._extra_slots: list[int] = []

    # ---- lanes --------------------------------------------------------------------------------
    def start(self, gen_end: int, logits: torch.Tensor, fork: Fork | None = None) -> Iterator[None]:
        """Add the lanes: the prompt (ending in the generation prompt) is in the cache up to
        ``gen_end``, ``logits`` are those of its last position; ``fork``: the speaking fork,
        made already in the same pass (its slot is this answer's from now on). A generator: it
        yields while the speaking fork's pre-fill waits for its pass; no lane of this answer is
        on the runner before both are ready (a lane stepped for a session that does not take
        its tokens would hold every other session's step)."""
        e, s = self.engine, self.sampling
        sampling = LaneSampling(s.temperature, s.top_p, s.top_k)
        if fork is not None:
            self._extra_slots.append(fork[0])  # freed by release
        if self.budget == 0:
            self._add("articulation", False, self.slot, gen_end, sampling, logits)
            self._force_next()
            return
        if fork is None and e.opts.speak_first:
            fork = yield from self._fork(gen_end)
        form = self._add("formulation", True, self.slot, gen_end, sampling, logits)
        form.solo = fork is None
        if form.solo and e.opts.speak_first:  # a fallback: the caller is not kept waiting
            self.budget = min(self.budget, e.opts.think_first_budget)
        if fork is not None:
            slot, fork_logits = fork
            position = gen_end + len(e.think_close_ids)
            self._add("articulation", False, slot, position, sampling, fork_logits)
        self._force_next()

    def _add(
        self,
        role: Role,
        in_thinking: bool,
        slot: int,
        position: int,
        sampling: LaneSampling,
        logits: torch.Tensor,
    ) -> LaneState:
        lane = self.engine.steps.add(slot, position, sampling, logits=logits)
        self._on_runner.append(lane)
        state = LaneState(role, lane, ReasoningParser(in_thinking), self.engine.tok.stream())
        self.lanes.append(state)
        return state

    def _fork(self, gen_end: int) -> Generator[None, None, tuple[int, torch.Tensor] | None]:
        """A copy of the slot's first ``gen_end`` rows with the reasoning closed (its pre-fill
        waits for a pass, yielding meanwhile); ``None`` without a free slot or pages."""
        e = self.engine
        if e.cache.free_slots == 0:
            e.counters["think_first_fallbacks"] += 1
            log.info("no free cache slot for the speaking fork: this answer thinks first")
            return None
        slot = e.cache.allocate(1)[0]
        self._extra_slots.append(slot)  # freed by release, also if it is cancelled meanwhile
        try:
            e.cache.copy_prefix(self.slot, slot, gen_end)
            logits = yield from e.prefill_chunks(e.embed_ids(e.think_close_ids), slot, gen_end)
        except (KVPoolFull, EngineBusy):
            self._extra_slots.remove(slot)
            e.steps.free([slot])  # and the pages the copy took
            e.counters["think_first_fallbacks"] += 1
            log.info("no KV pages for the speaking fork: this answer thinks first")
            return None
        return slot, logits

    def _drop(self, state: LaneState) -> None:
        self.engine.steps.remove(state.lane)
        self._on_runner.remove(state.lane)
        self.lanes.remove(state)

    def release(self) -> None:
        """Take the lanes off the runner and free the fork's slot (idempotent); an
        :meth:`events` generator still running stops at its next step."""
        self.released = True
        for lane in self._on_runner:
            self.engine.steps.remove(lane)
        self._on_runner = []
        self.engine.steps.free(self._extra_slots)
        self._extra_slots = []

    # ---- decoding -----------------------------------------------------------------------------
    def events(self, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        """The answer's events; ``None`` items mark a step (or a wait for other sessions to
        take their tokens) so that the worker can run other work in between."""
        e, stats, lanes = self.engine, self.stats, self.lanes
        max_answer = self.sampling.max_new_tokens
        form = next((ln for ln in lanes if ln.role == "formulation"), None)
        answer_tokens = 0
        while lanes:
            if cancel.cancelled or self.released:
                return
            if max(ln.lane.position for ln in lanes) + 1 >= e.cache.max_len:
                log.warning("context full: the answer is cut")
                break
            fed = e.steps.take([ln.lane for ln in lanes])
            if fed is None:
                yield None  # other sessions take their tokens of the last step first
                continue
            for ln in lanes:
                ln.force_due = True
            # before any event is handed out: the worker runs other sessions' streams at each
            # one, and the next step may come from them before this loop goes on
            self._force_next()
            now = time.monotonic()
            if stats.wall_first_token is None:
                stats.wall_first_token = now
            gave_way = False  # an event handed out is a turn of the worker already
            for lane, tok in zip(lanes, fed, strict=True):
                if self.on_token is not None:
                    self.on_token(lane.role, tok, now)
                stats.generated_tokens += 1
                if lane.role == "articulation":
                    answer_tokens += 1
                    if stats.wall_first_answer_token is None:
                        stats.wall_first_answer_token = now
                else:
                    stats.thinking_tokens += 1
                for ev in self._feed(lane, tok):
                    gave_way = gave_way or ev is not None
                    yield ev
                if lane.role == "articulation" and answer_tokens >= max_answer:
                    lane.done = True
            if self.released or cancel.cancelled:
                return  # let go while its events were handed out (a commit, a close)
            if any(ln.done and ln.role == "articulation" for ln in lanes):
                break
            self._schedule(form)
            for ln in [ln for ln in lanes if ln.done]:
                self._drop(ln)
            self._force_next()  # a lane that began to speak in this step (think-first)
            if not gave_way:
                yield None  # one step done: other work may run before the next
        for lane in lanes:
            for ev in lane.parser.close():
                yield from self._route(lane, ev)

    def _force_next(self) -> None:
        """``engine.forced_answer`` (random weights): the speaking lane's next input is the
        next token of the fixed text, whatever it sampled; the step costs the same. Once per
        step for each lane."""
        forced = self.engine.forced_ids
        for ln in self.lanes:
            if forced and ln.role == "articulation" and not ln.done and ln.force_due:
                self.engine.steps.force(ln.lane, forced[min(ln.forced, len(forced) - 1)])
                ln.forced += 1
                ln.force_due = False

    def _feed(self, lane: LaneState, tok: int) -> Iterator[TokenEvent]:
        lane.ids.append(tok)
        if tok in self.engine.stop_ids:  # the end: its text is no answer, flush the parser
            lane.done = True
            events = lane.parser.close()
        else:
            delta = lane.stream.push(tok)  # "" until the token completes a character
            lane.text += delta
            events = lane.parser.feed(delta) if delta else []
            if lane.parser.done:  # an end marker in the text (an end token the checkpoint
                lane.done = True  # does not list, e.g. <|im_end|>)
        for ev in events:
            yield from self._route(lane, ev)
        if lane.role == "formulation" and lane.parser.mode not in ("thinking", "done"):
            if lane.solo:
                lane.role = "articulation"  # think-first: the same lane answers
            else:
                lane.done = True  # it closed its reasoning itself: the speaking lane answers

    def _route(self, lane: LaneState, ev: TokenEvent) -> Iterator[TokenEvent]:
        if lane.role == "formulation" and ev.kind != "thinking":
            if not lane.solo:
                return  # a formulation lane never speaks
            lane.role = "articulation"  # think-first: the same lane goes on with the answer
        if ev.kind == "answer" and self.stats.wall_first_answer_token is None:
            self.stats.wall_first_answer_token = time.monotonic()
        yield ev

    def _schedule(self, form: LaneState | None) -> None:
        """Think budget, think-first close, hand-over of reasoning to the speaking lane."""
        e = self.engine
        if form is None:
            return
        if form.role == "formulation" and not form.done and len(form.ids) >= self.budget:
            if form.solo:  # think-first: close the block on the same lane, then answer
                e.steps.inject(form.lane, e.embed_ids(e.think_close_ids))
                form.parser.feed(THINK_CLOSE_TEXT)
                form.role = "articulation"
            else:
                form.done = True
        speaker = next((ln for ln in self.lanes if ln.role == "articulation"), None)
        if form.solo or speaker is None:
            return
        fresh = self._reasoning_ids(form)[form.handed :]
        ready = len(fresh) >= e.opts.refresh_tokens or (form.done and bool(fresh))
        if not (ready and ends_sentence(speaker.text) and len(speaker.ids) > speaker.handover_at):
            return
        block = e.embed_ids([*e.think_open_ids, *fresh, *e.think_close_ids])
        if speaker.lane.position + block.shape[0] + 1 >= e.cache.max_len:
            return
        e.steps.inject(speaker.lane, block)
        form.handed += len(fresh)
        speaker.handover_at = len(speaker.ids)
        self.handovers += 1

    def _reasoning_ids(self, form: LaneState) -> list[int]:
        """The formulation lane's reasoning: its ids up to ``</think>`` or a stop id."""
        close = self.engine.special.think_close
        out = []
        for t in form.ids:
            if t in self.engine.stop_ids or (close is not None and t == close):
                break
            out.append(t)
        return out
