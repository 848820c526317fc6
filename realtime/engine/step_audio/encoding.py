"""Audio to embeddings for the engine: one piece at a time, and what listening commits.

Listening encodes a growing window: every ``chunk_samples`` the current piece (at most 25 s) is
re-encoded from its start, and the new embeddings are committed except the last ``lookahead``
ones, whose right context is still coming; the last pass commits the rest. The encoder is
bidirectional, so committed embeddings differ slightly from a whole-piece encoding:
:func:`encoding_error` measures how much.
"""

from __future__ import annotations

import numpy as np
import torch

from realtime.models.step_audio.lengths import embeddings_for_samples
from realtime.models.step_audio.model import StepAudioModel


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
