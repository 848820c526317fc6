"""The Step-Audio engine: the model, the KV cache and the decode runner that all sessions share,
and :func:`build_step_audio_engine` for the ``step-audio`` and ``step-audio-random`` backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.batching import SharedSteps
from realtime.engine.step_audio.answering import THINK_CLOSE_TEXT, THINK_OPEN_TEXT
from realtime.engine.step_audio.encoding import encode_piece
from realtime.engine.step_audio.session import StepAudioSession
from realtime.models.decode import DecodeRunner, RunnerOptions
from realtime.models.step_audio.lengths import SAMPLE_RATE
from realtime.models.step_audio.model import StepAudioModel
from realtime.models.step_audio.prompt import PromptBuilder
from realtime.models.step_audio.tokens import SpecialTokens, TextTokenizer


@dataclass(frozen=True)
class StepAudioOptions:
    """Engine knobs that are not in :class:`EngineConfig`."""

    lookahead: int = 2  # embeddings held back while listening (right context still coming)
    refresh_tokens: int = 16  # new reasoning needed before it is handed to the speaking lane
    speak_first: bool = True  # False: one lane, think up to the budget, then answer
    compile: bool = True  # torch.compile the decode step's element-wise work (CUDA only)
    split_reductions: bool = False  # inductor setting for the compiled step (measured)


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
        self.stop_ids = frozenset(special.stop_ids)  # a lane stops at any of them
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
        self.think_close_ids = self.text_ids(THINK_CLOSE_TEXT)
        self.think_open_ids = self.text_ids(THINK_OPEN_TEXT)

    def text_ids(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.decoder.embed(torch.tensor(ids, device=self.device))

    def prefill(self, embeds: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """Write ``embeds`` into ``slot`` from position ``start``; the last position's logits."""
        if embeds.shape[0] == 0:
            raise ValueError("empty pre-fill")
        return self.runner.prefill(embeds, slot, start)

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


def build_step_audio_engine(
    cfg: EngineConfig, opts: StepAudioOptions | None = None
) -> StepAudioEngine:
    """``step-audio``: the checkpoint at ``cfg.model``; ``step-audio-random``: full-size random
    bf16 weights on the GPU (benchmarks only: no meaningful words) with a byte-level tokenizer
    (:mod:`realtime.models.step_audio.random_tokenizer`)."""
    from realtime.models.step_audio.checkpoint import load_step_audio, resolve_device

    if cfg.backend == "step-audio":
        dtype = None if cfg.dtype == "auto" else cfg.dtype
        loaded = load_step_audio(cfg.model, cfg.device, dtype, cache_dir=cfg.cache_dir)
        return StepAudioEngine(loaded.model, loaded.tokenizer, loaded.special, cfg, opts)
    if cfg.backend == "step-audio-random":
        from realtime.models.step_audio.model import random_step_audio
        from realtime.models.step_audio.random_tokenizer import random_tokenizer

        dev = resolve_device(cfg.device)
        dtype = torch.bfloat16 if cfg.dtype in ("auto", "bfloat16") else getattr(torch, cfg.dtype)
        model = random_step_audio(device=dev, dtype=dtype)
        tok = random_tokenizer()
        special = SpecialTokens.from_tokenizer(tok, check_known=True)
        model.audio_patch_id = special.audio_patch
        return StepAudioEngine(model, tok, special, cfg, opts, name="step-audio-random")
    raise ValueError(f"not a Step-Audio backend: {cfg.backend!r}")
