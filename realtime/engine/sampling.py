"""Next-token choice for CPU decoding loops (the GPU engine samples on the device)."""

from __future__ import annotations

import torch

from realtime.config import SamplingConfig


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Greedy when ``temperature`` is 0, else temperature + top-k + top-p sampling."""
    if cfg.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(scores, min(cfg.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < cfg.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
