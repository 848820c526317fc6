"""The shared parts of the Step-Audio engine that its sessions use (model, tokenizer, cache,
decode runner), apart from the engine so that the session modules need not import it."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from realtime.config import EngineConfig
from realtime.engine.batching import SharedSteps
from realtime.models.decode import DecodeRunner, RunnerOptions
from realtime.models.fp8 import quantize_decoder_
from realtime.models.qwen2 import Qwen2Config
from realtime.models.step_audio.lengths import SAMPLE_RATE
from realtime.models.step_audio.model import StepAudioModel
from realtime.models.step_audio.prompt import PromptBuilder
from realtime.models.step_audio.tokens import SpecialTokens, TextTokenizer

log = logging.getLogger(__name__)

THINK_CLOSE_TEXT = "\n</think>\n"
THINK_OPEN_TEXT = "<think>\n"


@dataclass(frozen=True)
class StepAudioOptions:
    """Engine knobs that are not in :class:`EngineConfig`."""

    lookahead: int = 2  # embeddings held back while listening (right context still coming)
    refresh_tokens: int = 16  # new reasoning needed before it is handed to the speaking lane
    speak_first: bool = True  # False: one lane, think up to the budget, then answer
    compile: bool = True  # torch.compile the decode step's element-wise work (CUDA only)
    split_reductions: bool = False  # inductor setting for the compiled step (measured)


GIB = 1024**3


def kv_bytes_per_position(c: Qwen2Config, dtype: torch.dtype) -> int:
    """KV-cache bytes of one position of one sequence (all layers, keys and values)."""
    per_position = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    return per_position * torch.tensor([], dtype=dtype).element_size()


def sessions_that_fit(
    c: Qwen2Config, dtype: torch.dtype, free: int, total: int, context: int
) -> int:
    """How many cache slots of ``context`` positions fit in ``free`` bytes after a reserve for
    activations, graphs and the audio encoder (the larger of 4 GiB and 5 % of ``total``);
    one more row is the cache's scratch slot."""
    reserve = max(4 * GIB, total // 20)
    return max(0, int((free - reserve) // (kv_bytes_per_position(c, dtype) * context)) - 1)


def cache_slots(model: StepAudioModel, cfg: EngineConfig) -> int:
    """``engine.max_batch``, or with 0 (auto) as many ``max_context`` slots as the GPU's free
    memory holds after a reserve for activations, graphs and the audio encoder. On CUDA it
    prints how many fit, and how many would at a 4k context."""
    if model.device.type != "cuda":
        return cfg.max_batch if cfg.max_batch > 0 else 4
    c = model.decoder_cfg
    per_slot = kv_bytes_per_position(c, model.dtype) * cfg.max_context
    free, total = torch.cuda.mem_get_info(model.device)
    fit = max(1, sessions_that_fit(c, model.dtype, free, total, cfg.max_context))
    fit_4k = sessions_that_fit(c, model.dtype, free, total, 4096)
    slots = cfg.max_batch if cfg.max_batch > 0 else fit
    print(
        f"engine: {cfg.weights} weights {model.decoder.weight_bytes() / GIB:.1f} GiB; "
        f"{fit} cache slots of {cfg.max_context} positions ({per_slot / GIB:.2f} GiB each) fit "
        f"in {free / GIB:.1f} GiB free ({fit_4k} at a 4096-position context); using {slots}: "
        f"{slots} callers at once, or {slots // 2} thinking and speaking at once",
        file=sys.stderr,
        flush=True,
    )
    return slots


class StepAudioCore:
    """What every session of the engine uses: the model, its tokenizer, the KV cache and the
    decode runner whose batched step the sessions' lanes share."""

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
        self.stop_ids = frozenset(special.stop_ids)  # a lane stops at any of them
        self.cfg = cfg
        self.opts = opts or StepAudioOptions()
        self.device = model.device
        self.builder = PromptBuilder(tokenizer, special)
        if cfg.weights == "fp8":
            saved = quantize_decoder_(model.decoder)
            log.info("decoder layer weights quantised to FP8 e4m3: %.1f GiB saved", saved / GIB)
        self.cache = model.new_cache(cache_slots(model, cfg), cfg.max_context)
        self.counters = {"sessions_refused": 0, "think_first_fallbacks": 0}  # for /metrics
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
        self.think_close_ids = self.text_ids(THINK_CLOSE_TEXT)
        self.think_open_ids = self.text_ids(THINK_OPEN_TEXT)
        # random weights write no words: the speaking lane is fed this text instead (benchmarks)
        self.forced_ids = (
            [*self.text_ids(cfg.forced_answer.strip()), special.eot] if cfg.forced_answer else []
        )
        if self.forced_ids:
            log.warning(
                "engine.forced_answer is set: every answer speaks this fixed text (%d tokens); "
                "the model's own tokens are computed and discarded",
                len(self.forced_ids),
            )

    def capacity_stats(self) -> dict[str, int]:
        """What the engine holds now, for ``/metrics`` (host-side bookkeeping only: safe to
        read from any thread, never touches the GPU)."""
        cache = self.cache
        used = cache.max_batch - cache.free_slots
        return {
            "sessions": used,
            "lanes_in_use": len(self.runner.lanes),
            "kv_slots_total": cache.max_batch,
            "kv_slots_used": used,
            "kv_positions_total": cache.max_batch * cache.max_len,
            "kv_positions_used": sum(cache.lengths[: cache.max_batch]),  # free slots hold 0
        }

    def text_ids(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.decoder.embed(torch.tensor(ids, device=self.device))

    def prefill(self, embeds: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Write ``embeds`` into ``slot`` from position ``start``; the last position's logits."""
        if embeds.shape[0] == 0:
            raise ValueError("empty pre-fill")
        return self.runner.prefill(embeds, slot, start)
