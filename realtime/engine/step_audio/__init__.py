"""Step-Audio-R1 engine: listen while thinking, think while speaking, on one decode loop.

**Listen while thinking.** ``listen`` gets the user's audio as it arrives. Every
``listen_chunk_ms`` (640 ms) the current 25 s piece is re-encoded *as a growing window* (the
encoder is bidirectional, so each pass sees all the audio so far; a 30 s window costs about
10 ms on an H100) and the new embeddings are pre-filled into the session's KV cache at once,
except the last ``lookahead`` ones, whose right context is still missing. At the end of speech
only the tail (at most one chunk plus the look-ahead, about 10 embeddings) and the turn's
closing tokens are left to pre-fill. Embeddings already in the cache are not revised, so they
differ slightly from a whole-utterance encoding; :func:`encoding_error` measures it and
``EngineConfig.exact_encoding`` re-encodes and re-fills the whole utterance at the end instead
(the answer is then exactly that of the whole utterance given at once).

Reasoning starts before the end of the turn is decided: the pipeline calls ``respond``
*speculatively* at a pause (``asr.speculative_after_ms`` of silence) and keeps its audio until
the endpoint. Nothing ``respond`` writes changes the listening state: the tail and everything
generated sit beyond the listened prefix, so when the user goes on, the next ``listen`` simply
writes over them (a rollback is a length reset). The answer that is finally spoken therefore
always conditions on the complete utterance. Reasoning on mid-speech partial input that would
be *kept* (SHANKS-style interleaving) is not done: Step-Audio-R1 is not trained for reasoning
inside a user turn.

**Think while speaking** (Mind-Paced-Speaking style, speak-first). With ``think_budget`` B > 0
two lanes run in the same batched step, which costs about the same as one because the step is
bound by reading the weights: the *formulation* lane goes on reasoning, the *articulation* lane
(a fork of the same cache rows) closes the reasoning at once and speaks; reasoning is handed to
it at sentence ends. The spoken answer never contains reasoning.

**Sessions** own cache slots (one while listening, two while speaking with reasoning), the
history and their sampling settings; the model, cache and decode runner belong to the engine.
Several sessions answer at once: the worker advances their ``respond`` generators in turn and
their lanes share each batched step (:class:`~realtime.engine.scheduler.Scheduler`), so a
second caller costs one more row of the step, not a wait for the first caller's answer.

Modules: :mod:`.encoding` (audio to embeddings, the chunked-encoding error), :mod:`.listening`
(the growing-window passes into the cache), :mod:`.answering` (the lanes, hand-over, think
budget, stop ids), :mod:`.session` (respond/commit/discard/close, history), :mod:`.engine`
(the shared model, cache and runner, and the backend factory).
"""

from realtime.engine.step_audio.encoding import chunked_embeddings, encode_piece, encoding_error
from realtime.engine.step_audio.engine import (
    StepAudioEngine,
    StepAudioOptions,
    build_step_audio_engine,
)
from realtime.engine.step_audio.session import StepAudioSession

__all__ = [
    "StepAudioEngine",
    "StepAudioOptions",
    "StepAudioSession",
    "build_step_audio_engine",
    "chunked_embeddings",
    "encode_piece",
    "encoding_error",
]
