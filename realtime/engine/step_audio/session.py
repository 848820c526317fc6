"""A Step-Audio conversation: listening, the answer, and the history, on its own cache slot.

``listen`` pre-fills the user turn as it is heard (:class:`Listening`). ``respond`` pre-fills
the rest of the turn and the generation prompt *beyond* the listened prefix and runs an
:class:`Answer`; it changes nothing that listening wrote, so after a speculative ``respond``
more audio simply continues the turn (its ``listen`` writes over the answer). Audio heard while
answering is listened to after the answer (the answer's lanes sit where it would be written).
``commit`` writes the assistant turn as it was really spoken (reasoning is not kept, as in the
Step-Audio chat format) and opens the next turn after it; ``discard`` forgets the partial turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from realtime.config import SamplingConfig
from realtime.engine.base import CancelToken, EngineBusy, TokenEvent, TurnStats, UserTurn
from realtime.engine.step_audio.answering import Answer, Fork, Role
from realtime.engine.step_audio.core import StepAudioCore
from realtime.engine.step_audio.listening import Listening
from realtime.engine.tools import NONE, ToolChoice, ToolSpec, tools_json
from realtime.models.kv_pages import KVPoolFull
from realtime.models.step_audio.prompt import (
    TOOL_RESULT_ROLE,
    AudioSlot,
    Conversation,
    Message,
    Turn,
    assistant_text,
)

T = TypeVar("T")
Chunks = Generator[None, None, T]  # pre-fill a chunk at a time (``scheduler.py``), then T


@dataclass
class _Answered:
    """What ``respond`` left for ``commit``: where the user turn ends in the cache."""

    turn_end: int  # cache length just after the user turn's <|EOT|>
    pieces: list[torch.Tensor]  # the audio embeddings of the turn, one tensor per piece
    audio: np.ndarray
    user: Message  # the user turn as the history renders it
    inputs: tuple[Message, ...] = ()  # tool results before it (a turn that returns them)


class StepAudioSession:
    def __init__(self, engine: StepAudioCore, system_prompt: str, sampling: SamplingConfig):
        self.engine = engine
        self.sampling = sampling
        self.stats = TurnStats()
        cache = engine.cache
        if cache.free_slots == 0 or cache.free_pages == 0:
            engine.counters["sessions_refused"] += 1
            what = (
                f"all {cache.max_batch} cache sequences of the engine are taken"
                if cache.free_slots == 0
                else f"all {cache.num_pages} KV pages of the engine are in use"
            )
            raise EngineBusy(
                f"{what}; try again when a conversation ends (engine.max_batch and "
                "engine.kv_pages set how many fit)"
            )
        self.slot = cache.allocate(1)[0]
        self.conv = Conversation(system_prompt, max_turns=engine.cfg.history_turns)
        self._turn_embeds: list[list[torch.Tensor]] = []  # per earlier turn, per piece
        self._hist_len = 0
        self._answered: _Answered | None = None
        self._answer: Answer | None = None  # while ``respond`` runs
        self._deferred: list[np.ndarray] = []  # audio heard while answering, listened after
        self._closed = False
        self._responding = False  # ``respond`` runs (from its turn's pre-fill on)
        self._prompt_changed = False
        self._dropped = 0  # committed turns trimmed from the history so far
        self._calls: list[str] = []  # the tool-call payloads of the last answer
        self.on_token: Callable[[Role, int, float], None] | None = None  # bench/debug hook
        self.handovers = 0  # reasoning blocks handed to the speaking lane (all turns)
        try:
            self._rebuild_history()
        except EngineBusy:
            engine.counters["sessions_refused"] += 1
            engine.steps.free([self.slot])
            raise
        engine.sessions += 1
        self._l = self._new_turn()

    def _new_turn(self) -> Listening:
        return Listening(self.engine, self.slot, pos=self._hist_len)

    def _rebuild_history(self) -> None:
        self.engine.steps.run_to_end(self._rebuild_history_chunks())

    def _rebuild_history_chunks(self) -> Chunks[None]:
        """Pre-fill system prompt + the kept history from position 0."""
        e = self.engine
        turns = self.conv.turns[-self.conv.max_turns :] if self.conv.max_turns else self.conv.turns
        embeds = self._turn_embeds[len(self._turn_embeds) - len(turns) :] if turns else []
        prompt = e.builder.render(self.conv.messages(), add_generation_prompt=False)
        if not prompt.ids:
            self._hist_len = 0
            return
        audio = [p for t in embeds for p in t]
        audio_t = torch.cat(audio) if audio else None
        embeds = e.model.embed(torch.tensor(prompt.ids), audio_t)
        yield from e.prefill_chunks(embeds, self.slot, 0)
        self._hist_len = len(prompt.ids)
        e.steps.truncate(self.slot, self._hist_len)  # pages beyond it go back to the pool

    def _trim_history(self, keep: int) -> Chunks[None]:
        """Keep the last ``keep`` turns and re-fill the cache from position 0 (the stored
        audio embeddings are reused; this runs when the next turn starts, before it is heard)."""
        self._dropped += len(self.conv.turns) - keep
        self.conv.turns = self.conv.turns[len(self.conv.turns) - keep :]
        self._turn_embeds = self._turn_embeds[len(self._turn_embeds) - keep :]
        yield from self._rebuild_history_chunks()

    # ---- listening ----------------------------------------------------------------------------
    @torch.inference_mode()
    def listen(self, pcm16k: np.ndarray) -> None:
        pcm = np.asarray(pcm16k, dtype=np.float32).reshape(-1)
        if self._answer is not None or self._responding:  # answering: its tokens sit where
            # this audio would go (or its turn is being pre-filled, a chunk at a time)
            self._deferred.append(pcm)
            return
        self._answered = None  # a speculative answer was not committed: more audio
        self._open_turn()
        self._l.hear(pcm)

    def set_instructions(self, system_prompt: str) -> None:
        """From the next turn on: the history is re-filled under the new prompt when that turn
        opens (a turn already being heard keeps the prompt it was heard under)."""
        self.conv.system_prompt = system_prompt
        self._prompt_changed = True

    def revise(self, turn: int, answer: str | None, forget_user: bool, forget_answer: bool) -> None:
        """Like a new system prompt, the history is re-filled when the next turn opens."""
        i = turn - self._dropped
        if not 0 <= i < len(self.conv.turns):
            return
        t = self.conv.turns[i]
        if answer is not None:
            t.answer = answer.strip()
        if forget_answer:
            t.answer = ""
        if forget_user:
            t.user = Message.text("human", "")
            self._turn_embeds[i] = []  # its audio goes with it
        self._prompt_changed = True

    def set_tools(self, tools: tuple[ToolSpec, ...], choice: ToolChoice) -> None:
        """From the next turn on, like ``set_instructions``: the tool schemas go in their own
        ``tool_json_schemas`` turn after the system prompt (none with ``choice`` "none"). A
        ``required`` or named choice is not enforced on this engine: the schemas are offered."""
        self.conv.tools = tools_json(tools) if tools and choice != NONE else ""
        self._prompt_changed = True

    def _open_turn(self) -> None:
        self.engine.steps.run_to_end(self._open_turn_chunks())

    def _open_turn_chunks(self) -> Chunks[None]:
        lst, e = self._l, self.engine
        if lst.opened:
            return
        if self._prompt_changed:
            self._prompt_changed = False
            yield from self._rebuild_history_chunks()
            lst.pos = self._hist_len
        limit = e.cfg.history_turns
        too_long = self._hist_len + 64 > e.cache.max_len // 2 and bool(self.conv.turns)
        if too_long or (limit and len(self.conv.turns) > limit):
            # down to half the window in one go: the cache is re-filled once per limit/2
            # turns, not every turn (the prefix stays put in between)
            yield from self._trim_history(
                len(self.conv.turns) // 2 if too_long else max(1, limit // 2)
            )
            lst.pos = self._hist_len
        lst.open()

    # ---- the end of the turn ------------------------------------------------------------------
    def _close_turn(self, turn: UserTurn) -> tuple[torch.Tensor, int]:
        logits, gen_end, _ = self.engine.steps.run_to_end(self._close_turn_chunks(turn))
        return logits, gen_end

    def _close_turn_chunks(
        self, turn: UserTurn, fork: bool = False
    ) -> Chunks[tuple[torch.Tensor, int, Fork | None]]:
        """Pre-fill the tail, ``<audio_end><|EOT|>`` and the generation prompt beyond the
        listened prefix, a chunk at a time. Returns (last logits, cache length, the speaking
        fork if ``fork`` and it could be made in the same pass: see :meth:`_prefill_forked`)."""
        e, lst = self.engine, self._l
        audio = lst.audio
        yield from self._open_turn_chunks()
        gen = e.builder.generation_prompt().ids
        if self.sampling.think_budget <= 0:
            gen = gen + e.think_close_ids  # an empty reasoning block: answer at once
        inputs: tuple[Message, ...] = ()
        pieces: list[torch.Tensor] = []
        if audio.shape[0] == 0 and turn.tool_results:  # tool outputs (and words) from the client
            inputs = tuple(Message.text(TOOL_RESULT_ROLE, r.output) for r in turn.tool_results)
            if turn.text:
                user = Message.text("human", turn.text)
            else:
                inputs, user = inputs[:-1], inputs[-1]
            rendered = e.builder.render([*inputs, user], add_generation_prompt=False).ids
            # the whole turn from its <|BOT|> on (the opened human header is written over)
            start = lst.body_start - len(e.builder.open_turn("human").ids)
            parts, ids = [e.embed_ids(rendered)], []
        elif audio.shape[0] == 0 and turn.text:  # a typed turn: text where the audio would be
            parts, start = [e.embed_ids(e.text_ids(turn.text))], lst.body_start
            ids = [e.special.eot]
            user = Message.text("human", turn.text)
        else:
            heard = lst.exact_turn(audio) if e.cfg.exact_encoding else lst.tail_turn(audio)
            pieces, parts, start = heard.pieces, heard.parts, heard.start
            # words that came with the speech (typed, a keypad key) follow it in the turn
            ids = [
                e.special.audio_end,
                *(e.text_ids(turn.text) if turn.text else []),
                e.special.eot,
            ]
            slots: tuple[AudioSlot | str, ...] = tuple(AudioSlot(p.shape[0]) for p in pieces)
            user = Message("human", (*slots, turn.text) if turn.text else slots)
        turn_end = start + sum(p.shape[0] for p in parts) + len(ids)
        embeds = torch.cat([*parts, e.embed_ids(ids + gen)])
        self.stats.prefill_tokens = embeds.shape[0]
        both = (yield from self._prefill_forked(embeds, start)) if fork else None
        if both is not None:
            logits, forked = both
        else:
            logits, forked = (yield from e.prefill_chunks(embeds, self.slot, start)), None
        self._answered = _Answered(turn_end, pieces, audio, user, inputs)
        return logits, turn_end + len(gen), forked

    def _prefill_forked(
        self, embeds: torch.Tensor, start: int
    ) -> Chunks[tuple[torch.Tensor, Fork] | None]:
        """The closing pre-fill with the speaking fork made in its pass (a free slot that
        copies this one, the reasoning closed at once after the generation prompt), saving the
        fork a pass of its own on the way to the first word. ``None``, with nothing taken, when
        there is no slot or page for it or the pieces do not fit one pass: then the answer
        forks as before (``Answer.start``)."""
        e = self.engine
        if e.cache.free_slots == 0:
            return None
        slot = e.cache.allocate(1)[0]
        try:
            tail = e.embed_ids(e.think_close_ids)
            got = yield from e.steps.prefill_and_fork(embeds, self.slot, start, slot, tail)
        except (KVPoolFull, EngineBusy):
            got = None
        except BaseException:
            e.steps.free([slot])
            raise
        if got is None:
            e.steps.free([slot])
            return None
        logits, fork_logits = got
        return logits, (slot, fork_logits)

    # ---- respond ------------------------------------------------------------------------------
    @torch.inference_mode()
    def respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        """The answer's events; ``None`` items mark a step (or a wait for other sessions to
        take their tokens) so that the worker can run other work in between."""
        self.stats = TurnStats()
        self._responding = True
        try:
            e = self.engine
            fork = self.sampling.think_budget > 0 and e.opts.speak_first
            chunks = self._close_turn_chunks(turn, fork)
            while True:  # the turn's pre-fill: other sessions step between its chunks
                try:
                    item = next(chunks)
                except StopIteration as done:
                    logits, gen_end, forked = done.value
                    break
                yield item
                if cancel.cancelled or self._closed:
                    chunks.close()
                    return
            answer = Answer(e, self.slot, self.sampling, self.stats, self.on_token)
            self._answer = answer  # from here its release frees the fork's slot
            self._calls = []
            yield from answer.start(gen_end, logits, forked)
            self.stats.wall_prefill_done = time.monotonic()
            for ev in answer.events(cancel):
                if ev is not None and ev.kind == "tool_call":
                    self._calls.append(ev.text.strip())
                yield ev
        finally:
            if self._answer is not None:
                self._answer.release()
                self.handovers += self._answer.handovers
            self._answer = None
            self._responding = False
            if self._deferred and not self._closed:  # what was heard meanwhile, in order
                pcm, self._deferred = np.concatenate(self._deferred), []
                self.listen(pcm)

    # ---- after the turn -----------------------------------------------------------------------
    @torch.inference_mode()
    def commit(self, turn: UserTurn, spoken_answer: str, interrupted: bool) -> None:
        e = self.engine
        if self._answer is not None:  # a cancelled answer that has not seen its next step
            self._answer.release()  # its lanes must not write into the history below
        if self._answered is None:  # respond never ran for this audio: close it now
            self._close_turn(turn)
        ans = self._answered
        assert ans is not None
        answer = spoken_answer.strip()
        if interrupted and answer:
            answer += " ..."
        if not interrupted:  # the calls the answer made stay in the history, after its words
            answer += "".join(f"<tool_call>{c}</tool_call>" for c in self._calls)
        self._calls = []
        msg = Message.text("assistant", assistant_text(answer))
        ids = e.builder.message(msg).ids
        e.defer_prefill(e.embed_ids(ids), self.slot, ans.turn_end)  # with the next pass
        self._hist_len = ans.turn_end + len(ids)
        self.conv.turns.append(Turn(user=ans.user, answer=answer, inputs=ans.inputs))
        self._turn_embeds.append(ans.pieces)
        self._answered = None
        self._l = self._new_turn()
        # the answer's reasoning and anything heard past the turn are not history: their
        # pages go back to the pool
        e.steps.truncate(self.slot, self._hist_len)

    def discard(self) -> None:
        self._answered = None
        self._l = self._new_turn()
        if self._answer is None and not self._responding:  # no lane writes past it now
            self.engine.steps.truncate(self.slot, self._hist_len)

    def close(self) -> None:
        """Free the slots; an answer still running stops at its next step (its lanes leave
        the runner now, so no later step writes into a slot that another session may get)."""
        if not self._closed:
            self.engine.sessions -= 1
        self._closed = True
        self._deferred = []
        if self._answer is not None:
            self._answer.release()
        self.engine.steps.free([self.slot])  # every KV page it held, its queued pieces
