"""The turn controller: the one owner of the state of a conversation's turns.

It sits in the pipeline between the listener and the engine. From the frames that come down
(speech started, paused, stopped; transcripts) and the client's requests (respond, cancel,
commit) it decides when to answer, when to start an answer speculatively, when to release,
drop or interrupt one; it tells the stages below with control frames. The output stage tells
it what went out (``on_output``), from which it keeps the clocks, what the user really heard,
the history, and the per-turn metrics.

Phases of the current turn::

    LISTENING --pause transcript--> SPECULATING --final transcript (same text)--> ANSWERING
    LISTENING --final transcript--------------------------------------------> ANSWERING
    SPECULATING --user goes on / other transcript / noise--> LISTENING (answer dropped)
    ANSWERING --first audio out--> SPEAKING --answer done--> LISTENING
    ANSWERING | SPEAKING --user speaks (barge-in) / cancel--> INTERRUPTED --> LISTENING

Barge-in (``barge_in`` in the config): ``immediate`` stops the answer at the user's first
voiced 60 ms. ``hold`` (the default) lets it go on while the speech is judged: it stops as soon
as a transcript of it (a partial one while the user speaks, or at a pause, or at its end) has
``min_words`` words that are not backchannels, from a decode Whisper was sure of
(realtime/barge_in.py), or when the speech has lasted ``min_speech_ms`` (``SpeechSustained``);
a burst that ends first with only backchannels ("uh-huh", "okay", a cough) is dropped: the
answer goes on, nothing is answered and the engine forgets its audio (the Realtime API client
still sees its speech events and transcript). While it is judged, Whisper decodes it with
``barge_in.asr_prompt`` (backchannels) before its prompt, and partial transcripts come every
``barge_in.partial_interval_ms`` (``asr_hint``).

A speculative answer is generated and synthesised while the endpointer is still waiting out
its silence, but nothing of it is heard until it is released.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from dataclasses import dataclass, field

from realtime.barge_in import BargeInPolicy
from realtime.context import SessionContext
from realtime.engine.base import UserTurn
from realtime.engine.tools import ToolResult
from realtime.frames import (
    AnswerText,
    CancelResponse,
    CommitTurn,
    DiscardTurn,
    ErrorFrame,
    Frame,
    Interruption,
    OutputAudio,
    ReleaseResponse,
    ReviseTurn,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    SpeechSustained,
    StartResponse,
    ThinkingText,
    ToolCall,
    Transcript,
    TurnMetrics,
    answer_id,
)
from realtime.listener import DecodeHint
from realtime.stages import Stage
from realtime.turn import Response, TurnClock

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    LISTENING = "listening"
    SPECULATING = "speculating"
    ANSWERING = "answering"
    SPEAKING = "speaking"
    INTERRUPTED = "interrupted"


@dataclass
class HistoryEntry:
    user: str
    answer: str
    spoken: str
    interrupted: bool
    engine_turn: int | None = None  # its index among the turns the engine committed
    response: Response | None = field(default=None, repr=False, compare=False)


class TurnController(Stage):
    def __init__(self, ctx: SessionContext, text_input: bool) -> None:
        super().__init__()
        self.ctx = ctx
        self.text_input = text_input  # the engine answers transcripts (not audio it heard)
        self.phase = Phase.LISTENING
        self.phases: list[Phase] = []  # every phase entered, in order (for tests and logs)
        self.clock = TurnClock()
        self.response: Response | None = None
        self.last_response: Response | None = None  # the last finished one (truncate)
        self.history: list[HistoryEntry] = []
        self.turns = 0
        self.pending_text: str | None = None  # a committed turn awaiting respond()
        self.pending_results: list[ToolResult] = []  # tool outputs for the next answer
        self._ids = itertools.count(1)
        self._committed = 0  # turns committed to the engine (CommitTurn)
        self.held = False  # the user speaks over an answer: judged before it is stopped
        self._t_speech = [0.0, 0.0]  # stream times: the user's speech started, last ended
        self._speaking = False  # the user's speech goes on (not paused, not stopped)
        self._policy = BargeInPolicy(ctx.config.barge_in)
        self._idle = asyncio.Event()
        self._idle.set()

    def _enter(self, phase: Phase) -> None:
        if phase is not self.phase:
            log.debug("turn phase %s -> %s", self.phase.value, phase.value)
        self.phase = phase
        self.phases.append(phase)

    # ---- frames from upstream ---------------------------------------------------------------
    async def process(self, frame: Frame) -> None:
        await self.push(frame)
        if isinstance(frame, SpeechStarted):
            self._t_speech = [frame.t, frame.t]
            self._speaking = True
            await self._on_speech()
        elif isinstance(frame, SpeechSustained):
            if self.held:
                log.debug(
                    "barge-in: speech went on for %d ms", self.ctx.config.barge_in.min_speech_ms
                )
                await self.interrupt()
        elif isinstance(frame, SpeechPaused) and frame.resumed:
            self._speaking = True
            await self._drop_speculation()
        elif isinstance(frame, SpeechPaused):
            self._t_speech[1], self._speaking = frame.t, False
        elif isinstance(frame, SpeechStopped):
            self._t_speech[1], self._speaking = frame.t_end, False
            self.clock.on_stopped(frame)
            if frame.noise:
                self.held = False  # a cough, a click: the answer goes on
                await self._drop_speculation()
                await self.push(DiscardTurn())
            else:
                self._idle.clear()  # busy until the turn's answer is done (or there is none)
        elif isinstance(frame, Transcript) and self.held:
            await self._judge(frame)
        elif isinstance(frame, Transcript):
            await self._on_transcript(frame)

    async def _on_speech(self) -> None:
        """Speech started: a new turn; barge in on an answer being heard."""
        self.clock = TurnClock()
        self.held = False
        resp = self.response
        if resp is None:
            return
        if not resp.released:
            await self._drop_speculation()
        elif self.ctx.options.interrupt_response:
            if self.ctx.config.barge_in.mode == "hold":
                self.held = True
            else:
                await self.interrupt()

    def asr_hint(self) -> DecodeHint:
        """How the listener decodes now: while the user's speech over the answer is judged,
        with backchannels in Whisper's prompt and partials every
        ``barge_in.partial_interval_ms``."""
        if not self.held:
            return DecodeHint()
        policy = self.ctx.config.barge_in
        return DecodeHint(policy.asr_prompt, policy.partial_interval_ms)

    async def _judge(self, frame: Transcript) -> None:
        """A transcript of speech over the answer, partial, at a pause or at its end: words that
        are not backchannels stop it (and the turn goes on as any other); a final one of
        backchannels only, of words Whisper was not sure of, or of more words than the speech
        could hold (Whisper hearing words in a cough), is dropped."""
        # how long the speech is: up to its pause or end, or while it goes on, as far as the
        # decoded audio (not known: the rate is not checked)
        end = frame.t_end if self._speaking else self._t_speech[1]
        speech_s = None if end is None else end - self._t_speech[0]
        if self._policy.stops(frame.text, frame.avg_logprob, speech_s):
            log.debug("barge-in: words that are not backchannels: %r", frame.text)
            await self.interrupt()
            self.held = False
            await self._on_transcript(frame)
        elif frame.final:
            log.debug("backchannel only: the answer goes on")
            self.held = False
            await self.push(DiscardTurn())
            self._close_turn()

    async def _on_transcript(self, frame: Transcript) -> None:
        if frame.candidate:
            opts = self.ctx.options
            if opts.create_response and self.ctx.config.engine.speculative:
                await self._start(UserTurn(text=frame.text), speculative=True)
        elif frame.final:
            self.clock.on_transcript()
            await self._on_final(frame.text)

    async def _on_final(self, text: str) -> None:
        self._idle.clear()
        resp = self.response
        if not text.strip() and self.text_input:
            await self._drop_speculation()
            await self.push(ErrorFrame("no_speech", "no words were recognised in the speech"))
            self._close_turn()
            return
        if not self.ctx.options.create_response:
            await self._drop_speculation()
            self.pending_text = text
            self._close_turn()
            return
        if self.pending_text is not None:  # typed text or keypad keys before the words
            text, self.pending_text = f"{self.pending_text} {text}".strip(), None
        if resp is not None and resp.speculative and not resp.released:
            if resp.turn.text == text and not resp.failed:
                await self._release(resp)
                return
            await self._drop_speculation()
        await self._start(UserTurn(text=text), speculative=False)

    # ---- requests from the client -------------------------------------------------------------
    async def respond(self, text: str | None = None) -> None:
        """Start an answer: to ``text``, to pending user messages, or to the last turn."""
        if text is None:
            text, self.pending_text = self.pending_text, None
        results, self.pending_results = tuple(self.pending_results), []
        if text is None and not results:
            raise ValueError("nothing to respond to: no committed audio or user message")
        self.clock = TurnClock()
        self.clock.wall_speech_end = self.clock.wall_decided = time.monotonic()
        await self._start(UserTurn(text=text or "", tool_results=results), speculative=False)

    def add_tool_result(self, result: ToolResult) -> None:
        self.pending_results.append(result)

    def add_user_text(self, text: str) -> None:
        self.pending_text = text if self.pending_text is None else f"{self.pending_text} {text}"

    async def interrupt(self) -> None:
        """Stop the answer in flight; what the user heard of it goes to the history."""
        self.held = False
        resp = self.response
        if resp is None:
            return
        await self._cancel(resp)
        self._enter(Phase.INTERRUPTED)
        spoken = self._delivered(resp, interrupted=True)
        await self.push(Interruption(spoken))
        await self._finish(resp, interrupted=True)

    def entry(self, response_id: int | None = None) -> HistoryEntry:
        """The history entry of answer ``response_id`` (None: the last answer); KeyError if none."""
        for e in reversed(self.history):
            if e.response is not None and (response_id is None or e.response.id == response_id):
                return e
        raise KeyError(f"no answer {response_id} in the history")

    def truncate(self, audio_end_ms: int, response_id: int | None = None) -> str:
        """The client played only ``audio_end_ms`` of an answer (default: the last one): the
        history, the engine's too, keeps what was heard, which is returned."""
        try:
            e = self.entry(response_id)
        except KeyError:
            if response_id is not None:
                raise
            return ""
        assert e.response is not None
        heard = e.response.heard_text(audio_end_ms / 1000)
        if heard != e.spoken:
            e.spoken = heard
            e.interrupted = e.interrupted or heard != e.answer.strip()
            as_committed = f"{heard} ..." if e.interrupted and heard else heard  # as commit() does
            self._revise(ReviseTurn(-1, answer=as_committed), e)
        return e.spoken

    def forget(self, response_id: int, user: bool, answer: bool) -> None:
        """Delete the user's part and/or the answer of a turn, from the engine's history too."""
        e = self.entry(response_id)
        if user:
            e.user = ""
        if answer:
            e.answer = e.spoken = ""
        self._revise(ReviseTurn(-1, forget_user=user, forget_answer=answer), e)

    def _revise(self, change: ReviseTurn, e: HistoryEntry) -> None:
        if e.engine_turn is None:
            return
        frame = ReviseTurn(e.engine_turn, change.answer, change.forget_user, change.forget_answer)
        self.ctx.spawn(self.push(frame))  # after the turn's CommitTurn, in order

    async def discard(self) -> None:
        """The client cleared the input: the engine forgets the turn's audio."""
        await self._drop_speculation()
        await self.push(DiscardTurn())

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    async def wait_idle(self) -> None:
        """Until no turn is being transcribed or answered."""
        while True:
            await self._idle.wait()
            await asyncio.sleep(0)
            if self._idle.is_set():
                return

    async def close(self) -> None:
        if self.response is not None:
            await self._cancel(self.response)
            self.response = None

    # ---- answers ------------------------------------------------------------------------------
    async def _start(self, turn: UserTurn, speculative: bool) -> None:
        await self._drop_speculation()  # a newer speculative answer replaces an older one
        resp = Response(next(self._ids), turn, self.clock, speculative)
        self.response = resp
        self._enter(Phase.SPECULATING if speculative else Phase.ANSWERING)
        await self.push(StartResponse(resp.id, turn, speculative, resp.cancel))
        if not speculative:
            self._idle.clear()
            await self._release(resp)

    async def _release(self, resp: Response) -> None:
        resp.released = True
        resp.clock.wall_released = time.monotonic()
        if resp.clock.wall_first_audio is None:
            self._enter(Phase.ANSWERING)
        await self.push(ReleaseResponse(resp.id))

    async def _cancel(self, resp: Response) -> None:
        resp.cancel.cancel()
        await self.push(CancelResponse(resp.id))

    async def _drop_speculation(self) -> None:
        resp = self.response
        if resp is not None and not resp.released:
            self.response = None
            await self._cancel(resp)
            self._enter(Phase.LISTENING)

    def on_output(self, frame: Frame, played: bool) -> None:
        """What the output stage received (``played=False``) or handed out (``True``)."""
        resp = self.response
        if resp is None or answer_id(frame) != resp.id:
            return
        if not played:
            if isinstance(frame, AnswerText) and not frame.end:
                resp.clock.on_token(answer=True)
                resp.answer += frame.text
            elif isinstance(frame, (ThinkingText, ToolCall)):
                resp.clock.on_token(answer=False)
                if isinstance(frame, ThinkingText):
                    resp.thinking += frame.text
            elif isinstance(frame, OutputAudio):
                resp.clock.on_audio_ready()
            elif isinstance(frame, ErrorFrame):
                resp.failed = True
            elif isinstance(frame, AnswerText) and frame.end:
                resp.usage = dict(frame.usage)
        elif isinstance(frame, OutputAudio):
            if resp.clock.wall_first_audio is None:
                self._enter(Phase.SPEAKING)
            resp.on_audio_out(frame)
        elif isinstance(frame, AnswerText) and frame.end:
            self.response = None  # done: a barge-in from now on interrupts nothing
            self.ctx.spawn(self._finish(resp, interrupted=False))

    async def _finish(self, resp: Response, interrupted: bool) -> None:
        if self.response is resp:
            self.response = None
        self.last_response = resp
        spoken = self._delivered(resp, interrupted)
        self.turns += 1
        entry = HistoryEntry(
            resp.turn.text, resp.answer, spoken, interrupted, self._committed, resp
        )
        self._committed += 1
        self.history.append(entry)
        await self.push(self._metrics(resp, interrupted, spoken))
        await self.push(CommitTurn(resp.turn, spoken, interrupted))
        self._enter(Phase.LISTENING)
        self._close_turn()

    def _close_turn(self) -> None:
        if self.response is None or not self.response.released:
            self._idle.set()

    def _delivered(self, resp: Response, interrupted: bool) -> str:
        """What reached the user: the whole answer, unless speech was cut off (then the pieces
        they began to hear). A text-only answer was delivered as far as it was written."""
        if interrupted and self.ctx.options.speak:
            lead = self.ctx.options.output_lead_s
            return resp.heard_text(resp.heard_s(self.ctx.pace_output, lead))
        return resp.answer.strip()

    def _metrics(self, resp: Response, interrupted: bool, spoken: str) -> TurnMetrics:
        tc, rc = resp.turn_clock, resp.clock
        end = tc.wall_speech_end

        def rel(t: float | None) -> float | None:
            return None if t is None or end is None else t - end

        first_packet = rel(rc.wall_first_audio)
        breakdown = {
            "endpoint_s": rel(tc.wall_decided),
            "transcript_s": rel(tc.wall_transcript),
            "response_start_s": rel(rc.wall_start),
            "first_token_s": rel(rc.wall_first_token),
            "first_answer_token_s": rel(rc.wall_first_answer_token),
            "last_token_s": rel(rc.wall_last_token),
            "first_audio_ready_s": rel(rc.wall_audio_ready),
            "released_s": rel(rc.wall_released),
            "first_audio_packet_s": first_packet,
            "speculative": 1.0 if resp.speculative else 0.0,
        }
        return TurnMetrics(
            turn=self.turns,
            first_packet_s=first_packet,
            breakdown=breakdown,
            usage=resp.usage,
            response_id=resp.id,
            audio_s=resp.audio_s,
            interrupted=interrupted,
            transcript=resp.turn.text,
            answer=resp.answer.strip(),
            spoken=spoken,
        )
