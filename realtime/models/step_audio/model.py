"""``StepAudioModel``: front end + audio encoder + adapter + the Qwen2.5 decoder.

Module names: ``encoder.*``, ``adapter.*`` as in the checkpoint, and the decoder under
``decoder.``; the checkpoint's ``model.*`` / ``lm_head.*`` are the decoder's own names, so a
checkpoint name maps to a module name by prefixing ``decoder.`` (:func:`module_name`).

Construction never runs the random initialisers (:func:`build_empty`: the meta device, then
``to_empty``): parameters are allocated uninitialised on the target device in the target
dtype, then filled from the checkpoint (``checkpoint.py``) or with random values on the device
(:func:`fill_random`, :func:`random_step_audio`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from realtime.models.qwen2 import KVCache, Qwen2ForCausalLM
from realtime.models.step_audio.adapter import AudioAdapter
from realtime.models.step_audio.config import StepAudioConfig, step_audio_r1_config
from realtime.models.step_audio.encoder import AudioEncoder
from realtime.models.step_audio.frontend import LogMel
from realtime.models.step_audio.lengths import audio_lengths, chunk_spans
from realtime.models.step_audio.tokens import AUDIO_PATCH, KNOWN_IDS

DECODER_PREFIXES = ("model.", "lm_head.")


def module_name(checkpoint_name: str) -> str:
    return (
        f"decoder.{checkpoint_name}"
        if checkpoint_name.startswith(DECODER_PREFIXES)
        else checkpoint_name
    )


def checkpoint_name(name: str) -> str:
    return name.removeprefix("decoder.")


class AudioCountError(ValueError):
    """The prompt's <audio_patch> count differs from the number of audio embeddings."""


class StepAudioModel(nn.Module):
    def __init__(self, cfg: StepAudioConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder_cfg = cfg.text
        self.encoder = AudioEncoder(cfg.audio)
        self.adapter = AudioAdapter(cfg.audio)
        self.decoder = Qwen2ForCausalLM(self.decoder_cfg)
        self.audio_patch_id = KNOWN_IDS[AUDIO_PATCH]  # replaced by the tokenizer's on load
        self._logmel: LogMel | None = None

    # ---- names -------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a checkpoint must provide, by checkpoint name (tied weights once)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.state_dict(keep_vars=True).items():
            ck = checkpoint_name(name)
            if ck == "lm_head.weight" and self.decoder_cfg.tie_word_embeddings:
                continue
            out[ck] = t
        return out

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    # ---- audio -------------------------------------------------------------------------
    @property
    def logmel(self) -> LogMel:
        if self._logmel is None or self._logmel.device != self.device:
            self._logmel = LogMel(self.device, self.cfg.audio.n_mels)
        return self._logmel

    @torch.inference_mode()
    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """One piece's normalised log mel ``[n_mels, T]`` -> ``[N, llm_dim]`` embeddings."""
        if mel.dim() != 2 or mel.shape[0] != self.cfg.audio.n_mels:
            raise ValueError(f"expected mel [{self.cfg.audio.n_mels}, T], got {tuple(mel.shape)}")
        lens = audio_lengths(
            mel.shape[1], self.cfg.audio.kernel_size, self.cfg.audio.adapter_stride
        )
        if lens.embeddings == 0:
            return torch.empty(0, self.cfg.audio.llm_dim, device=self.device, dtype=self.dtype)
        x = mel.to(self.device, self.dtype)[None]
        states, _ = self.encoder(x)  # valid frames: all but the last two, as lens counts them
        # like the reference, the adapter sees every pooled frame (the last embedding can
        # reach one frame past the valid ones), then the valid embeddings are kept
        return self.adapter(states)[0, : lens.embeddings]

    def encode_audio_chunks(self, audio: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """16 kHz mono audio -> one embedding tensor per 25 s piece (as the reference cuts it).

        Pieces are encoded one at a time; the reference batches them, zero-padding the mel of
        a shorter last piece, which changes only its last one or two embeddings slightly."""
        n = int(audio.shape[0])
        return [self.encode_mel(self.logmel(audio[s:e])) for s, e in chunk_spans(n)]

    def encode_audio(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """16 kHz mono samples (1-D) or one piece's log mel ``[n_mels, T]`` -> ``[N, llm_dim]``."""
        if isinstance(audio, torch.Tensor) and audio.dim() == 2:
            return self.encode_mel(audio)
        chunks = self.encode_audio_chunks(audio)
        if not chunks:
            return torch.empty(0, self.cfg.audio.llm_dim, device=self.device, dtype=self.dtype)
        return torch.cat(chunks)

    # ---- text --------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, audio_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the ``<audio_patch>`` positions replaced, in order, by
        ``audio_embeds [N, llm_dim]``. ``ids`` is ``[T]`` or ``[B, T]``; the output adds ``H``."""
        ids = ids.to(self.device)
        embeds = self.decoder.embed(ids)
        mask = ids == self.audio_patch_id
        n_slots = int(mask.sum())
        n_audio = 0 if audio_embeds is None else int(audio_embeds.shape[0])
        if n_slots != n_audio:
            raise AudioCountError(
                f"the prompt has {n_slots} <audio_patch> tokens (id {self.audio_patch_id}) but "
                f"{n_audio} audio embeddings were given"
            )
        if audio_embeds is None or n_audio == 0:
            return embeds
        if audio_embeds.shape[-1] != embeds.shape[-1]:
            raise AudioCountError(
                f"audio embeddings are {audio_embeds.shape[-1]} wide, the decoder {embeds.shape[-1]}"
            )
        src = audio_embeds.to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(mask[..., None], src)

    def new_cache(self, max_batch: int, max_len: int) -> KVCache:
        return KVCache(self.decoder_cfg, max_batch, max_len, self.device, self.dtype)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        **kwargs: object,
    ) -> torch.Tensor:
        return self.decoder(embeds, positions, cache, slots, **kwargs)  # type: ignore[arg-type]

    @torch.inference_mode()
    def generate_greedy(
        self,
        ids: list[int],
        audio_embeds: torch.Tensor | None,
        stop_ids: tuple[int, ...],
        max_new_tokens: int = 64,
    ) -> list[int]:
        """Reference decoding loop (batch 1, greedy): prefill then one token per step until a
        stop id (included in the result) or ``max_new_tokens``. For tests and debugging; the
        engine has its own batched loop."""
        max_len = len(ids) + max_new_tokens
        cache = self.new_cache(1, max_len)
        slots = torch.zeros(1, dtype=torch.long, device=self.device)
        t = torch.tensor([ids], device=self.device)
        pos = torch.arange(len(ids), device=self.device)[None]
        logits = self(self.embed(t, audio_embeds), pos, cache, slots, last_only=True)
        out: list[int] = []
        for step in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop_ids:
                break
            p = torch.tensor([[len(ids) + step]], device=self.device)
            e = self.decoder.embed(torch.tensor([[nxt]], device=self.device))
            logits = self(e, p, cache, slots)
        return out


def full_tensors(cfg: StepAudioConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the model of ``cfg`` by checkpoint name, on the meta device (shapes)."""
    with torch.device("meta"):
        return StepAudioModel(cfg).checkpoint_tensors()


def build_empty(
    cfg: StepAudioConfig, device: torch.device | str, dtype: torch.dtype
) -> StepAudioModel:
    """The model with uninitialised weights of ``dtype`` on ``device`` (fill them before use).

    Built on the meta device (no memory; the initialisers touch no data), cast there, given
    real uninitialised storage with ``to_empty``; what construction computes rather than
    loads (the decoder's RoPE frequencies, tied embeddings) is then redone on the device."""
    with torch.device("meta"):
        model = StepAudioModel(cfg)
    model = model.to(dtype).to_empty(device=torch.device(device))
    model.decoder.after_to_empty()
    return model.eval().requires_grad_(False)


def random_init_kind(name: str) -> str:
    """How :func:`fill_random` fills parameter ``name``: ``"one"`` (norm weights), ``"zero"``
    (biases) or ``"normal"`` (the rest, drawn in parameter order from one generator)."""
    is_norm = "norm" in name or name.endswith(("_ln.weight", "_ln.bias"))
    if is_norm and name.endswith("weight"):
        return "one"
    return "zero" if name.endswith("bias") else "normal"


@torch.no_grad()
def fill_random(model: StepAudioModel, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place on the model's device: norms 1, biases 0, the rest N(0, std)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        kind = random_init_kind(name)
        if kind == "one":
            p.fill_(1.0)
        elif kind == "zero":
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)


def random_step_audio(
    cfg: StepAudioConfig | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> StepAudioModel:
    """Full-size (by default the 33B Step-Audio-R1 shape) model with RANDOM weights, built
    directly on ``device``. For benchmarks only: it produces no meaningful words."""
    model = build_empty(cfg or step_audio_r1_config(), device, dtype)
    fill_random(model, seed)
    return model
