"""Step-Audio-R1 engine: listen while thinking, think while speaking, on one decode loop.

**Listen while thinking.** ``listen`` gets the user's audio as it arrives. Every
``listen_chunk_ms`` (640 ms) the current 25 s piece is re-encoded *as a growing window* (the
encoder is bidirectional, so each pass sees all the audio so far; a 30 s window costs about
10 ms on an H100) and the new embeddings are pre-filled into the session's KV cache at once,
except the last ``lookahead`` ones, whose right context is still missing. At the end of speech
only the tail (at most one chunk plus the look-ahead, about 10 embeddings) and the turn's
closing tokens are left to pre-fill. Embeddings already in the cache are not revised, so they
differ slightly from a whole-utterance encoding; :func:`encoding_error` measures it and
``EngineConfig.exact_encoding`` re-encodes and re-fills the whole utterance at the end instead.

Reasoning starts before the end of the turn is decided: the pipeline calls ``respond``
*speculatively* at a pause (``asr.speculative_after_ms`` of silence) and keeps its audio until
the endpoint. Nothing ``respond`` writes changes the listening state: the tail and everything
generated sit beyond the listened prefix, so when the user goes on, the next ``listen`` simply
writes over them (a rollback is a length reset). The answer that is finally spoken therefore
always conditions on the complete utterance: a ``respond`` that was started before more audio
came is cancelled and a new one runs on the longer input. Reasoning on mid-speech partial input
that would be *kept* (SHANKS-style interleaving) is not done: Step-Audio-R1 is not trained for
reasoning inside a user turn.

**Think while speaking** (Mind-Paced-Speaking style, speak-first). With ``think_budget`` B > 0
two lanes run in the same batched step, which costs about the same as one because the step is
bound by reading the weights: the *formulation* lane continues the reasoning block on the
session's slot, the *articulation* lane is a fork of the same prefix (the cache rows are copied,
nothing recomputed) that closes the reasoning at once (``\\n</think>\\n``) and speaks. At each
sentence end of the answer, reasoning written since the last hand-over (at least
``refresh_tokens`` tokens) is inserted into the articulation lane as a reasoning block
(``<think>\\n...\\n</think>\\n``) and speaking goes on from it. The formulation lane stops after
B reasoning tokens or when it closes its block; speech never waits for it. B = 0 is one lane
that answers after an empty reasoning block. Without a free slot for the fork, one lane thinks
up to B tokens, then ``</think>`` is forced (think-first).

The spoken answer never contains reasoning: each lane's text goes through its own
:class:`ReasoningParser`; the formulation lane only yields ``thinking`` events, the
articulation lane ``answer`` events (and ``thinking`` ones if it opens a block itself).

**Sessions** own cache slots (one while listening, two while speaking with reasoning), the
history and their sampling settings; the model, cache and decode runner belong to the engine.
Several sessions answer at once: the worker advances their ``respond`` generators in turn and
their lanes share each batched step (:class:`~realtime.engine.batching.SharedSteps`), so a
second caller costs one more row of the step, not a wait for the first caller's answer. Audio a
session hears while it is answering is listened to after the answer (its lanes occupy the
positions the audio would be written to). ``commit`` rewrites the assistant turn to what was
really spoken (reasoning is not kept in history, as in the Step-Audio chat format).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.base import CancelToken, EngineInfo, TokenEvent, TurnStats, UserTurn
from realtime.engine.batching import SharedSteps
from realtime.engine.parser import ReasoningParser
from realtime.models.decode import DecodeRunner, Lane, LaneSampling, RunnerOptions
from realtime.models.step_audio.lengths import CHUNK_SAMPLES, SAMPLE_RATE, embeddings_for_samples
from realtime.models.step_audio.model import StepAudioModel
from realtime.models.step_audio.prompt import (
    AudioSlot,
    Conversation,
    Message,
    PromptBuilder,
    Turn,
    assistant_text,
)
from realtime.models.step_audio.tokens import SpecialTokens, TextTokenizer

log = logging.getLogger(__name__)

THINK_CLOSE_TEXT = "\n</think>\n"
THINK_OPEN_TEXT = "<think>\n"
SENTENCE_ENDS = (".", "!", "?", "\n", ":", ";")

Role = Literal["formulation", "articulation"]


@dataclass(frozen=True)
class StepAudioOptions:
    """Engine knobs that are not in :class:`EngineConfig`."""

    lookahead: int = 2  # embeddings held back while listening (right context still coming)
    refresh_tokens: int = 16  # new reasoning needed before it is handed to the speaking lane
    speak_first: bool = True  # False: one lane, think up to the budget, then answer
    compile: bool = True  # torch.compile the decode step's element-wise work (CUDA only)
    split_reductions: bool = False  # inductor setting for the compiled step (measured)


# ---- audio encoding ---------------------------------------------------------------------------
def encode_piece(model: StepAudioModel, pcm: np.ndarray) -> torch.Tensor:
    """Embeddings ``[N, H]`` of one piece (at most 25 s) of 16 kHz audio."""
    if pcm.shape[0] == 0 or embeddings_for_samples(pcm.shape[0]) == 0:
        return torch.empty(0, model.cfg.audio.llm_dim, device=model.device, dtype=model.dtype)
    return model.encode_audio(np.ascontiguousarray(pcm, dtype=np.float32))


def chunked_embeddings(
    model: StepAudioModel, pcm: np.ndarray, chunk_samples: int, lookahead: int
) -> torch.Tensor:
    """What listening commits for one piece: growing-window passes every ``chunk_samples``,
    each keeping all but ``lookahead`` new embeddings; the last pass commits the rest."""
    out: list[torch.Tensor] = []
    done = 0
    for end in range(chunk_samples, pcm.shape[0], chunk_samples):
        emb = encode_piece(model, pcm[:end])
        keep = max(emb.shape[0] - lookahead, done)
        out.append(emb[done:keep])
        done = keep
    emb = encode_piece(model, pcm)
    out.append(emb[done:])
    return torch.cat(out)


def encoding_error(
    model: StepAudioModel, pcm: np.ndarray, chunk_samples: int, lookahead: int
) -> dict[str, float]:
    """Chunked (listening) against whole-utterance embeddings of one piece: relative L2 error
    overall and of the worst embedding, and the mean cosine similarity."""
    whole = encode_piece(model, pcm).float()
    chunked = chunked_embeddings(model, pcm, chunk_samples, lookahead).float()
    assert chunked.shape == whole.shape, (chunked.shape, whole.shape)
    diff = chunked - whole
    per = diff.norm(dim=-1) / whole.norm(dim=-1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(chunked, whole, dim=-1)
    return {
        "rel_l2": float(diff.norm() / whole.norm().clamp_min(1e-12)),
        "max_rel_l2_per_embedding": float(per.max()) if per.numel() else 0.0,
        "mean_cosine": float(cos.mean()) if cos.numel() else 1.0,
        "embeddings": float(whole.shape[0]),
    }


# ---- engine -----------------------------------------------------------------------------------
class StepAudioEngine:
    input_kind: Literal["text", "audio"] = "audio"
    # sessions' answers advance in turn and share each batched step (SharedSteps)
    interleaved_responses = True

    def __init__(
        self,
        model: StepAudioModel,
        tokenizer: TextTokenizer,
        special: SpecialTokens,
        cfg: EngineConfig,
        opts: StepAudioOptions | None = None,
        name: str = "step-audio",
    ) -> None:
        self.name = name
        self.model = model
        self.tok = tokenizer
        self.special = special
        self.cfg = cfg
        self.opts = opts or StepAudioOptions()
        self.device = model.device
        self.builder = PromptBuilder(tokenizer, special)
        self.cache = model.new_cache(cfg.max_batch, cfg.max_context)
        graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.runner = DecodeRunner(
            model.decoder,
            self.cache,
            RunnerOptions(
                cuda_graphs=graphs,
                compile=graphs and self.opts.compile,
                attention=cfg.attention,
                batch_sizes=(1, 2, 4),
                split_reductions=self.opts.split_reductions,
            ),
        )
        self.steps = SharedSteps(self.runner)
        self.chunk_samples = max(1, cfg.listen_chunk_ms * SAMPLE_RATE // 1000)
        self.info = EngineInfo(
            name=name,
            device=str(self.device),
            dtype=str(model.dtype).removeprefix("torch."),
            attention=self.runner.attention_name,
            extra={
                "cuda_graphs": str(graphs),
                "compiled_step": str(self.runner.compiled),
                "listen_chunk_ms": str(cfg.listen_chunk_ms),
                "exact_encoding": str(cfg.exact_encoding),
            },
        )
        self._close_ids = self.text_ids(THINK_CLOSE_TEXT)
        self._open_ids = self.text_ids(THINK_OPEN_TEXT)

    def text_ids(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.decoder.embed(torch.tensor(ids, device=self.device))

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> StepAudioSession:
        return StepAudioSession(self, system_prompt, sampling)

    @torch.inference_mode()
    def warmup(self) -> None:
        """Capture the step and pre-fill graphs and run the encoder once."""
        self.runner.capture_all()
        encode_piece(self.model, np.zeros(self.chunk_samples, dtype=np.float32))
        self.runner.sync()

    def close(self) -> None:
        self.runner.clear()


# ---- session ----------------------------------------------------------------------------------
@dataclass
class _Listening:
    """The current user turn as far as it is in the cache (never changed by ``respond``)."""

    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    opened: bool = False
    pos: int = 0  # cache length of the listened prefix
    body_start: int = 0  # position of the first <audio_start> of the turn
    piece_start: int = 0  # sample where the current 25 s piece starts
    encoded_upto: int = 0  # samples the last growing-window pass covered
    committed: int = 0  # embeddings of the current piece in the cache
    done_pieces: list[torch.Tensor] = field(default_factory=list)  # finished pieces' embeddings
    current: list[torch.Tensor] = field(default_factory=list)  # the current piece's, committed


@dataclass
class _Answered:
    """What ``respond`` left for ``commit``: where the user turn ends in the cache."""

    turn_end: int  # cache length just after the user turn's <|EOT|>
    pieces: list[torch.Tensor]  # the audio embeddings of the turn, one tensor per piece
    audio: np.ndarray
    user: Message  # the user turn as the history renders it


@dataclass
class _LaneState:
    role: Role
    lane: Lane  # its row on the engine's runner (shared with other sessions' lanes)
    parser: ReasoningParser
    ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    solo: bool = False  # think-first: one lane that reasons, then answers
    handed: int = 0  # formulation: reasoning tokens already given to the speaker
    handover_at: int = -1  # articulation: its token count at the last hand-over


class StepAudioSession:
    def __init__(self, engine: StepAudioEngine, system_prompt: str, sampling: SamplingConfig):
        self.engine = engine
        self.sampling = sampling
        self.stats = TurnStats()
        self.slot = engine.cache.allocate(1)[0]
        self.conv = Conversation(system_prompt, max_turns=engine.cfg.history_turns)
        self._turn_embeds: list[list[torch.Tensor]] = []  # per earlier turn, per piece
        self._hist_len = 0
        self._answered: _Answered | None = None
        self._extra_slots: list[int] = []
        self._lanes: list[Lane] = []  # this session's lanes on the runner while it answers
        self._deferred: list[np.ndarray] = []  # audio heard while answering, listened after
        self._closed = False
        self.on_token: Callable[[Role, int, float], None] | None = None  # bench/debug hook
        self.handovers = 0  # reasoning blocks handed to the speaking lane (all turns)
        self._rebuild_history()
        self._l = _Listening(pos=self._hist_len)

    # ---- cache helpers ----------------------------------------------------------------------
    def _prefill(self, embeds: torch.Tensor, start: int, slot: int | None = None) -> torch.Tensor:
        if embeds.shape[0] == 0:
            raise ValueError("empty pre-fill")
        return self.engine.runner.prefill(embeds, self.slot if slot is None else slot, start)

    def _rebuild_history(self) -> None:
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
        self._prefill(e.model.embed(torch.tensor(prompt.ids), audio_t), 0)
        self._hist_len = len(prompt.ids)

    # ---- listening ----------------------------------------------------------------------------
    @torch.inference_mode()
    def listen(self, pcm16k: np.ndarray) -> None:
        if self._lanes:  # answering: the answer's tokens sit where this audio would go
            self._deferred.append(np.asarray(pcm16k, dtype=np.float32).reshape(-1))
            return
        lst = self._l
        if self._answered is not None:  # a speculative answer was not committed: more audio
            self._answered = None
        lst.audio = np.concatenate([lst.audio, np.asarray(pcm16k, dtype=np.float32).reshape(-1)])
        self._open_turn()
        step = self.engine.chunk_samples
        while lst.audio.shape[0] - lst.encoded_upto >= step:
            self._advance(lst.encoded_upto + step)

    def _open_turn(self) -> None:
        lst = self._l
        if lst.opened:
            return
        e = self.engine
        limit = e.cfg.history_turns
        too_long = self._hist_len + 64 > e.cache.max_len // 2 and bool(self.conv.turns)
        if too_long or (limit and len(self.conv.turns) > limit):
            self._trim_history(len(self.conv.turns) // 2 if too_long else limit)
            lst.pos = self._hist_len
        ids = e.builder.open_turn("human").ids
        lst.body_start = lst.pos + len(ids)
        self._prefill(e.embed_ids([*ids, e.special.audio_start]), lst.pos)
        lst.pos += len(ids) + 1
        lst.opened = True

    def _trim_history(self, keep: int) -> None:
        """Keep the last ``keep`` turns and re-fill the cache from position 0 (the stored
        audio embeddings are reused; this runs when the next turn starts, before it is heard)."""
        self.conv.turns = self.conv.turns[len(self.conv.turns) - keep :]
        self._turn_embeds = self._turn_embeds[len(self._turn_embeds) - keep :]
        self._rebuild_history()

    def _advance(self, upto: int) -> None:
        """One growing-window pass over the current piece up to sample ``upto``."""
        lst, e = self._l, self.engine
        while upto - lst.piece_start >= CHUNK_SAMPLES:  # a full 25 s piece: close it exactly
            end = lst.piece_start + CHUNK_SAMPLES
            emb = encode_piece(e.model, lst.audio[lst.piece_start : end])
            self._commit_embeddings(emb[lst.committed :])
            lst.done_pieces.append(torch.cat(lst.current))
            ids = [e.special.audio_end, e.special.audio_start]
            self._prefill(e.embed_ids(ids), lst.pos)
            lst.pos += 2
            lst.piece_start, lst.committed, lst.current = end, 0, []
        lst.encoded_upto = upto
        if upto <= lst.piece_start:
            return
        emb = encode_piece(e.model, lst.audio[lst.piece_start : upto])
        keep = max(emb.shape[0] - e.opts.lookahead, lst.committed)
        self._commit_embeddings(emb[lst.committed : keep])

    def _commit_embeddings(self, emb: torch.Tensor) -> None:
        lst = self._l
        if emb.shape[0] == 0:
            return
        self._prefill(emb, lst.pos)
        lst.pos += emb.shape[0]
        lst.committed += emb.shape[0]
        lst.current.append(emb)

    # ---- the end of the turn --------------------------------------------------------------------
    def _final_audio(self, turn: UserTurn) -> np.ndarray:
        heard = self._l.audio
        if turn.audio is not None and turn.audio.shape[0] > heard.shape[0]:
            return np.asarray(turn.audio, dtype=np.float32).reshape(-1)
        return heard

    def _close_turn(self, turn: UserTurn) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
        """Pre-fill the tail, ``<audio_end><|EOT|>`` and the generation prompt beyond the
        listened prefix. Returns (last logits, cache length, the turn's pieces)."""
        e, lst = self.engine, self._l
        audio = self._final_audio(turn)
        if audio.shape[0] > lst.audio.shape[0]:
            self.listen(audio[lst.audio.shape[0] :])  # audio that never came through listen
        self._open_turn()
        gen = e.builder.generation_prompt().ids
        if self.sampling.think_budget <= 0:
            gen = gen + e._close_ids  # an empty reasoning block: answer at once
        ids = [e.special.audio_end, e.special.eot]
        if audio.shape[0] == 0 and turn.text:  # a typed turn: text where the audio would be
            pieces: list[torch.Tensor] = []
            parts, start = [e.embed_ids(e.text_ids(turn.text))], lst.body_start
            ids = [e.special.eot]
            user = Message.text("human", turn.text)
        elif e.cfg.exact_encoding:
            pieces = [encode_piece(e.model, audio[s : s + CHUNK_SAMPLES]) for s in
                      range(0, max(audio.shape[0], 1), CHUNK_SAMPLES)]  # fmt: skip
            pieces = [p for p in pieces if p.shape[0]] or [pieces[0]]
            parts = []
            for i, p in enumerate(pieces):
                if i:
                    parts.append(e.embed_ids([e.special.audio_end, e.special.audio_start]))
                parts.append(p)
            start = lst.body_start + 1
        else:
            tail = encode_piece(e.model, audio[lst.piece_start :])[lst.committed :]
            pieces = [*lst.done_pieces, torch.cat([*lst.current, tail])]
            parts, start = [tail], lst.pos
        if pieces:
            user = Message("human", tuple(AudioSlot(p.shape[0]) for p in pieces))
        turn_end = start + sum(p.shape[0] for p in parts) + len(ids)
        embeds = torch.cat([*parts, e.embed_ids(ids + gen)])
        self.stats.prefill_tokens = embeds.shape[0]
        logits = self._prefill(embeds, start)
        self._answered = _Answered(turn_end, pieces, audio, user)
        return logits, turn_end + len(gen), pieces

    # ---- respond --------------------------------------------------------------------------------
    @torch.inference_mode()
    def respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        """The answer's events; ``None`` items mark a step (or a wait for other sessions to
        take their tokens) so that the worker can run other work in between."""
        self.stats = stats = TurnStats()
        e = self.engine
        logits, gen_end, _ = self._close_turn(turn)
        budget = max(0, self.sampling.think_budget)
        sampling = LaneSampling(self.sampling.temperature, self.sampling.top_p, self.sampling.top_k)
        lanes: list[_LaneState] = []
        try:
            if budget == 0:
                lane = self._add_lane(self.slot, gen_end, sampling, logits)
                lanes.append(_LaneState("articulation", lane, ReasoningParser(False)))
            else:
                lane = self._add_lane(self.slot, gen_end, sampling, logits)
                lanes.append(_LaneState("formulation", lane, ReasoningParser(True)))
                fork = self._fork(gen_end) if e.opts.speak_first else None
                lanes[0].solo = fork is None
                if fork is not None:
                    slot, fork_logits = fork
                    lane = self._add_lane(slot, gen_end + len(e._close_ids), sampling, fork_logits)
                    lanes.append(_LaneState("articulation", lane, ReasoningParser(False)))
            stats.wall_prefill_done = time.monotonic()
            yield from self._decode(lanes, budget, cancel)
        finally:
            self._release_lanes()
            if self._deferred and not self._closed:  # what was heard meanwhile, in order
                pcm, self._deferred = np.concatenate(self._deferred), []
                self.listen(pcm)

    def _add_lane(
        self, slot: int, position: int, sampling: LaneSampling, logits: torch.Tensor
    ) -> Lane:
        lane = self.engine.steps.add(slot, position, sampling, logits=logits)
        self._lanes.append(lane)
        return lane

    def _release_lanes(self) -> None:
        for lane in self._lanes:
            self.engine.steps.remove(lane)
        self._lanes = []
        self.engine.cache.free(self._extra_slots)
        self._extra_slots = []

    def _fork(self, gen_end: int) -> tuple[int, torch.Tensor] | None:
        e = self.engine
        if e.cache.free_slots == 0:
            return None
        slot = e.cache.allocate(1)[0]
        self._extra_slots.append(slot)
        e.cache.copy_prefix(self.slot, slot, gen_end)
        return slot, self._prefill(e.embed_ids(e._close_ids), gen_end, slot)

    def _decode(
        self, lanes: list[_LaneState], budget: int, cancel: CancelToken
    ) -> Iterator[TokenEvent | None]:
        e, stats = self.engine, self.stats
        max_answer = self.sampling.max_new_tokens
        form = next((ln for ln in lanes if ln.role == "formulation"), None)
        answer_tokens = 0
        while lanes:
            if cancel.cancelled or self._closed:
                return
            if max(ln.lane.position for ln in lanes) + 1 >= e.cache.max_len:
                log.warning("context full: the answer is cut")
                break
            fed = e.steps.take([ln.lane for ln in lanes])
            if fed is None:
                yield None  # other sessions take their tokens of the last step first
                continue
            now = time.monotonic()
            if stats.wall_first_token is None:
                stats.wall_first_token = now
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
                yield from self._feed(lane, tok)
                if lane.role == "articulation" and answer_tokens >= max_answer:
                    lane.done = True
            if any(ln.done and ln.role == "articulation" for ln in lanes):
                break
            self._schedule(lanes, form, budget)
            for ln in [ln for ln in lanes if ln.done]:
                e.steps.remove(ln.lane)
                self._lanes.remove(ln.lane)
                lanes.remove(ln)
            yield None  # one step done: other work may run before the next
        for lane in lanes:
            for ev in lane.parser.close():
                yield from self._route(lane, ev)

    def _feed(self, lane: _LaneState, tok: int) -> Iterator[TokenEvent]:
        lane.ids.append(tok)
        text = self.engine.tok.decode(lane.ids)
        if not text.endswith("\ufffd"):
            delta, lane.text = text[len(lane.text) :], text
            for ev in lane.parser.feed(delta):
                yield from self._route(lane, ev)
        if tok == self.engine.special.eot or lane.parser.done:
            lane.done = True
        if lane.role == "formulation" and lane.parser.mode not in ("thinking", "done"):
            if lane.solo:
                lane.role = "articulation"  # think-first: the same lane answers
            else:
                lane.done = True  # it closed its reasoning itself: the speaking lane answers

    def _route(self, lane: _LaneState, ev: TokenEvent) -> Iterator[TokenEvent]:
        if lane.role == "formulation" and ev.kind != "thinking":
            if not lane.solo:
                return  # a formulation lane never speaks
            lane.role = "articulation"  # think-first: the same lane goes on with the answer
        if ev.kind == "answer" and self.stats.wall_first_answer_token is None:
            self.stats.wall_first_answer_token = time.monotonic()
        yield ev

    def _schedule(self, lanes: list[_LaneState], form: _LaneState | None, budget: int) -> None:
        """Think budget, think-first close, hand-over of reasoning to the speaking lane."""
        e = self.engine
        if form is None:
            return
        if form.role == "formulation" and not form.done and len(form.ids) >= budget:
            if form.solo:  # think-first: close the block on the same lane, then answer
                e.steps.inject(form.lane, e.embed_ids(e._close_ids))
                form.parser.feed(THINK_CLOSE_TEXT)
                form.role = "articulation"
            else:
                form.done = True
        speaker = next((ln for ln in lanes if ln.role == "articulation"), None)
        if form.solo or speaker is None:
            return
        fresh = self._reasoning_ids(form)[form.handed :]
        ready = len(fresh) >= e.opts.refresh_tokens or (form.done and bool(fresh))
        at_sentence_end = speaker.text.rstrip(" ").endswith(SENTENCE_ENDS)
        if not (ready and at_sentence_end and len(speaker.ids) > speaker.handover_at):
            return
        block = e.embed_ids([*e._open_ids, *fresh, *e._close_ids])
        if speaker.lane.position + block.shape[0] + 1 >= e.cache.max_len:
            return
        e.steps.inject(speaker.lane, block)
        form.handed += len(fresh)
        speaker.handover_at = len(speaker.ids)
        self.handovers += 1

    def _reasoning_ids(self, form: _LaneState) -> list[int]:
        eot = self.engine.special.eot
        close = self.engine.special.think_close
        out = []
        for t in form.ids:
            if t == eot or (close is not None and t == close):
                break
            out.append(t)
        return out

    # ---- after the turn -------------------------------------------------------------------------
    @torch.inference_mode()
    def commit(self, turn: UserTurn, spoken_answer: str, interrupted: bool) -> None:
        e = self.engine
        if self._answered is None:  # respond never ran for this audio: close it now
            self._close_turn(turn)
        ans = self._answered
        assert ans is not None
        answer = spoken_answer.strip()
        if interrupted and answer:
            answer += " ..."
        msg = Message.text("assistant", assistant_text(answer))
        ids = e.builder.message(msg).ids
        self._prefill(e.embed_ids(ids), ans.turn_end)
        self._hist_len = ans.turn_end + len(ids)
        self.conv.turns.append(Turn(user=ans.user, answer=answer))
        self._turn_embeds.append(ans.pieces)
        self._answered = None
        self._l = _Listening(pos=self._hist_len)

    def discard(self) -> None:
        self._answered = None
        self._l = _Listening(pos=self._hist_len)

    def close(self) -> None:
        """Free the slots; an answer still running stops at its next step (its lanes leave
        the runner now, so no later step writes into a slot that another session may get)."""
        self._closed = True
        self._deferred = []
        self._release_lanes()
        self.engine.cache.free([self.slot])


# ---- factory --------------------------------------------------------------------------------------
def build_step_audio_engine(
    cfg: EngineConfig, opts: StepAudioOptions | None = None
) -> StepAudioEngine:
    """``step-audio``: the checkpoint at ``cfg.model``; ``step-audio-random``: full-size random
    bf16 weights on the GPU (benchmarks only: no meaningful words) with the test tokenizer."""
    from realtime.models.step_audio.checkpoint import load_step_audio, resolve_device

    if cfg.backend == "step-audio":
        dtype = None if cfg.dtype == "auto" else cfg.dtype
        loaded = load_step_audio(cfg.model, cfg.device, dtype, cache_dir=cfg.cache_dir)
        return StepAudioEngine(loaded.model, loaded.tokenizer, loaded.special, cfg, opts)
    if cfg.backend == "step-audio-random":
        from tokenizers import Tokenizer

        from realtime.models.step_audio.model import random_step_audio
        from realtime.models.step_audio.testing import tiny_tokenizer_json

        dev = resolve_device(cfg.device)
        dtype = torch.bfloat16 if cfg.dtype in ("auto", "bfloat16") else getattr(torch, cfg.dtype)
        model = random_step_audio(device=dev, dtype=dtype)
        tok = TextTokenizer(Tokenizer.from_str(tiny_tokenizer_json()), "test tokenizer")
        special = SpecialTokens.from_tokenizer(tok, check_known=True)
        model.audio_patch_id = special.audio_patch
        return StepAudioEngine(model, tok, special, cfg, opts, name="step-audio-random")
    raise ValueError(f"not a Step-Audio backend: {cfg.backend!r}")
