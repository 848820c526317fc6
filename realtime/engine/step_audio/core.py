"""The shared parts of the Step-Audio engine that its sessions use (model, tokenizer, cache,
decode runner), apart from the engine so that the session modules need not import it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from realtime.config import EngineConfig
from realtime.engine.batching import SharedSteps
from realtime.models.decode import DecodeRunner, RunnerOptions
from realtime.models.step_audio.lengths import SAMPLE_RATE
from realtime.models.step_audio.model import StepAudioModel
from realtime.models.step_audio.prompt import PromptBuilder
from realtime.models.step_audio.tokens import SpecialTokens, TextTokenizer

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
