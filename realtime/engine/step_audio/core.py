"""The shared parts of the Step-Audio engine that its sessions use (model, tokenizer, cache,
decode runner), apart from the engine so that the session modules need not import it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from realtime.config import EngineConfig
from realtime.engine.scheduler import Scheduler
from realtime.engine.step_audio.encoding import encode_piece
from realtime.engine.step_audio.fp8_setup import prepare_fp8
from realtime.engine.step_audio.ranks import Followers, RankMemory
from realtime.engine.work_timer import WorkTimer
from realtime.models.decode import DecodeRunner, RunnerOptions
from realtime.models.kv_pages import PagedKVCache
from realtime.models.prefill import BATCH_ROWS
from realtime.models.qwen2 import Qwen2Config
from realtime.models.step_audio.encoder_graphs import EncoderGraphs
from realtime.models.step_audio.lengths import SAMPLE_RATE
from realtime.models.step_audio.model import StepAudioModel
from realtime.models.step_audio.prompt import PromptBuilder
from realtime.models.step_audio.tokens import SpecialTokens, TextTokenizer
from realtime.models.tp_runner import MirroredCache, MirroredRunner

log = logging.getLogger(__name__)

THINK_CLOSE_TEXT = "\n</think>\n"
THINK_OPEN_TEXT = "<think>\n"


@dataclass(frozen=True)
class StepAudioOptions:
    """Engine knobs that are not in :class:`EngineConfig`."""

    lookahead: int = 2  # embeddings held back while listening (right context still coming)
    refresh_tokens: int = 16  # new reasoning needed before it is handed to the speaking lane
    speak_first: bool = True  # False: one lane, think up to the budget, then answer
    # No slot for the speaking fork (a full engine): the one lane thinks at most this many
    # tokens before it answers, not the whole think budget (512 tokens is ~15 s of silence
    # at a loaded step's pace)
    think_first_budget: int = 32
    compile: bool = True  # torch.compile the decode step's element-wise work (CUDA only)
    split_reductions: bool = False  # inductor setting for the compiled step (measured)
    # engine.tensor_parallel: the process group's collective timeout (a rank that stops
    # answering; one that dies is caught at once, ranks.py)
    tp_timeout_s: float = 300.0
    tp_check: bool = False  # compare every rank's lanes and pages after each call (tests)


GIB = 1024**3
# Step graphs are captured per (batch size, attention-length bucket, greedy, riders) and
# compiled once per shape, all at start-up: each size added costs start-up time, and the shapes
# must stay under the compiler's recompile limit (backend.RECOMPILE_LIMIT), past which steps
# would silently run uncompiled. engine.max_batch past 32 adds itself as one more size.
STEP_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
MAX_AUTO_SEQUENCES = 32  # engine.max_batch 0: at most this many sequences (lanes) at once


def kv_bytes_per_position(c: Qwen2Config, dtype: torch.dtype) -> int:
    """KV-cache bytes of one position of one sequence (all layers, keys and values)."""
    per_position = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
    return per_position * torch.tensor([], dtype=dtype).element_size()


def sessions_that_fit(
    c: Qwen2Config, dtype: torch.dtype, free: int, total: int, context: int
) -> int:
    """How many sessions of ``context`` positions the KV pages that fit in ``free`` bytes hold
    (after the reserve of :func:`pool_bytes`)."""
    return max(0, pool_bytes(free, total) // (kv_bytes_per_position(c, dtype) * context))


def pool_bytes(free: int, total: int, transient: int = 0) -> int:
    """Bytes for the KV pool: ``free`` less a reserve for activations, graphs and the audio
    encoder (the larger of 4 GiB and 5 % of ``total``) and ``transient`` more
    (:func:`batched_prefill_bytes`)."""
    return max(0, free - max(4 * GIB, total // 20) - transient)


def batched_prefill_bytes(c: Qwen2Config, dtype: torch.dtype, max_len: int) -> int:
    """What the widest batched pre-fill pass holds at once beyond the reserve: its attention
    gathers one layer's keys and values of every row up to the attention length (32 rows of
    ``max_len`` positions at most, ``prefill.BATCH_ROWS``), twice that with the graphs'
    workspace. At 8192 positions, 2 GiB; without it the graphs' capture ran out of memory
    beside a pool sized to the old reserve (H100, 01:31 UTC 2026-11-28)."""
    per_layer_position = (
        c.num_key_value_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()
    )
    return 2 * 2 * BATCH_ROWS[-1] * max_len * per_layer_position


@dataclass(frozen=True)
class PoolPlan:
    """The KV pool the engine allocates: ``sequences`` at once (a session, and its speaking
    fork while it reasons and speaks), ``pages`` of ``page_size`` positions shared by them."""

    sequences: int
    pages: int
    page_size: int


def plan_pool(
    model: StepAudioModel, cfg: EngineConfig, ranks: list[RankMemory] | None = None
) -> PoolPlan:
    """``engine.kv_pages`` pages, or with 0 (auto) as many as the GPU's free memory holds
    after the reserve (CPU: ``max_batch`` sessions at ``max_context``). ``engine.max_batch``
    sequences, or with 0 (auto) one per page of the pool up to ``MAX_AUTO_SEQUENCES``. Prints the pool, and how
    many sessions fit at ``max_context`` and at a 4k context.

    Tensor parallel (``ranks``: every rank's memory after its weights): ``model`` is rank 0's
    shard, so a page is one rank's KV heads; every rank holds the same pages, so the pool is
    sized by the rank with the least free memory."""
    page = cfg.kv_page_size
    if page < 1:
        raise ValueError(f"engine.kv_page_size must be positive, not {page}")
    per_seq = -(-cfg.max_context // page)
    c = model.decoder_cfg
    per_page = kv_bytes_per_position(c, model.dtype) * page
    if model.device.type != "cuda":
        pages = cfg.kv_pages or max(cfg.max_batch, 1) * per_seq
        free = total = 0
    else:
        free, total = torch.cuda.mem_get_info(model.device)
        if ranks:
            free = min(free, *(r.free for r in ranks))
            total = min(total, *(r.total for r in ranks))
        transient = batched_prefill_bytes(c, model.dtype, per_seq * page)
        pages = cfg.kv_pages or max(per_seq, pool_bytes(free, total, transient) // per_page - 1)
    if ranks:
        cards = ", ".join(
            f"rank {r.rank} ({r.device}) {r.weight_bytes / GIB:.2f} GiB" for r in ranks
        )
        print(
            f"engine: tensor parallel over {len(ranks)} ranks "
            f"({'NCCL' if model.device.type == 'cuda' else 'gloo'}); weights per card: {cards} "
            "(rank 0 also holds the audio encoder); the KV pool below is per card (its share of "
            "the KV heads)",
            file=sys.stderr,
            flush=True,
        )
    sequences = cfg.max_batch if cfg.max_batch > 0 else max(2, min(MAX_AUTO_SEQUENCES, pages))
    positions = pages * page
    fit = positions // (per_seq * page)
    fit_4k = positions // (-(-4096 // page) * page)
    where = f" in {free / GIB:.1f} GiB free" if free else ""
    print(
        f"engine: {cfg.weights} weights {model.decoder.weight_bytes() / GIB:.1f} GiB; "
        f"KV pool of {pages} pages x {page} positions = {positions} positions "
        f"({pages * per_page / GIB:.2f} GiB{where}): {fit} sessions at their full "
        f"{cfg.max_context}-position context, {fit_4k} at a 4096-position context, more while "
        f"contexts are short; up to {sequences} sequences at once (a caller who thinks and "
        "speaks at once takes two)",
        file=sys.stderr,
        flush=True,
    )
    return PoolPlan(sequences=sequences, pages=pages, page_size=page)


def runner_options(
    cfg: EngineConfig, device: torch.device, opts: StepAudioOptions
) -> RunnerOptions:
    """The decode runner's options (every tensor-parallel rank builds its runner with them)."""
    graphs = cfg.cuda_graphs and device.type == "cuda"
    return RunnerOptions(
        cuda_graphs=graphs,
        compile=graphs and opts.compile,
        attention=cfg.attention,
        batch_sizes=STEP_BATCH_SIZES,
        split_reductions=opts.split_reductions,
        # riders are rank 0's own rows: the followers' steps would not carry them
        riders=cfg.prefill_in_step and cfg.tensor_parallel == 1,
    )


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
        followers: Followers | None = None,
    ) -> None:
        """``followers``: the other ranks under ``engine.tensor_parallel`` (``ranks.py``),
        their shards loaded and the process group joined; ``model`` is then rank 0's."""
        self.name = name
        self.followers = followers
        self.model = model
        self.tok = tokenizer
        self.special = special
        self.stop_ids = frozenset(special.stop_ids)  # a lane stops at any of them
        self.cfg = cfg
        self.opts = opts or StepAudioOptions()
        self.device = model.device
        self.builder = PromptBuilder(tokenizer, special)
        if cfg.weights == "fp8":  # (quantised already under tensor parallelism)
            prepare_fp8(model, cfg, self.builder)
        plan = plan_pool(model, cfg, followers.memory if followers else None)
        cache = PagedKVCache(
            model.decoder_cfg, plan.sequences, cfg.max_context, model.device, model.dtype,
            page_size=plan.page_size, num_pages=plan.pages,
        )  # fmt: skip
        self.counters = {"sessions_refused": 0, "think_first_fallbacks": 0}  # for /metrics
        self.counters["kv_pool_full"] = 0  # a pre-fill or a step found no free page
        self.sessions = 0  # open sessions
        ropts = runner_options(cfg, self.device, self.opts)
        runner = DecodeRunner(model.decoder, cache, ropts)
        if followers is None:
            self.cache: PagedKVCache | MirroredCache = cache
            self.runner: DecodeRunner | MirroredRunner = runner
        else:  # every call that changes the runner or the pages is repeated on each rank
            leader = followers.start_runners(
                (plan.sequences, plan.pages, plan.page_size), ropts, runner, cache,
                check=self.opts.tp_check,
            )  # fmt: skip
            self.cache = MirroredCache(cache, leader)
            self.runner = MirroredRunner(runner, self.cache, leader)
        # decode steps and batched pre-fill passes (a lane or piece with no KV page counts as
        # kv_pool_full)
        self.work = WorkTimer(self.device)  # device time by kind of work (``/metrics``)
        self.encoder_graphs: EncoderGraphs | None = None  # captured by ``warmup`` (GPU)
        self.steps = Scheduler(
            self.runner, cfg.prefill_chunk, self.counters, defer_ms=cfg.prefill_defer_ms,
            timer=self.work,
        )  # fmt: skip
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
            "sessions": self.sessions,
            "lanes_in_use": len(self.runner.lanes),
            "kv_slots_total": cache.max_batch,  # sequences (a session, its speaking fork)
            "kv_slots_used": used,
            "kv_pages_total": cache.num_pages,
            "kv_pages_used": cache.pages_used,
            "kv_positions_total": cache.num_pages * cache.page_size,
            "kv_positions_used": sum(cache.lengths[: cache.max_batch]),  # free slots hold 0
            **self.work.stats(),  # device time by kind of work, totals so far
        }

    def encode(self, pcm: np.ndarray) -> torch.Tensor:
        """:func:`encode_piece` (one piece of audio to embeddings), timed as encoder work;
        through the encoder's CUDA graphs once they are captured (``warmup``)."""
        with self.work.track("audio_encoder"):
            if self.encoder_graphs is not None and pcm.shape[0]:
                emb = self.encoder_graphs.encode(pcm)
                if emb is not None:
                    return emb
            return encode_piece(self.model, pcm)

    def text_ids(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.decoder.embed(torch.tensor(ids, device=self.device))

    def prefill_chunks(
        self, embeds: torch.Tensor, slot: int, start: int
    ) -> Generator[None, None, torch.Tensor]:
        """Write ``embeds`` into ``slot`` from ``start`` with the next batched passes, yielding
        while it waits for them (``scheduler.py``); the last position's logits."""
        return self.steps.prefill(embeds, slot, start)

    def defer_prefill(self, embeds: torch.Tensor, slot: int, start: int) -> None:
        """Write ``embeds`` into ``slot`` from ``start`` with a later pass; nobody waits."""
        self.steps.defer(embeds, slot, start)

    def between_jobs(self) -> None:
        """The worker's hook between its jobs: while no lane decodes (nothing else would run
        a pass soon), the queued pre-fill pieces run now, on a GPU that is idle otherwise;
        and the device work timed so far is added up."""
        if not self.runner.lanes:
            self.steps.flush(force=True)
        self.work.collect()
