"""Next-token choice, the one sampler of the project (the GPU runner and the CPU SmolLM loop)."""

from __future__ import annotations

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    greedy_only: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits [B, V]`` -> token ids ``[B]`` on the logits' device, with per-row
    ``temperature``, ``top_p`` (float) and ``top_k`` (int) tensors of shape ``[B]``.

    * Temperature 0: the argmax (``greedy_only=True`` skips the rest when every row is greedy:
      no sort, no random draw).
    * Else the logits are divided by the temperature and the distribution is cut to the
      ``top_k`` most likely tokens (0 = no limit; exactly ``k``, ties broken by the sort) and to
      the nucleus: a token is kept iff the probability of the tokens ranked above it is below
      ``top_p`` -- the smallest set whose mass reaches ``top_p``, the token that crosses it
      included; the most likely token is always kept (``top_p`` 0 is greedy).
    * The draw is the exponential race (the argmax of ``p / Exp(1)`` noise is distributed as
      ``p`` normalised), which needs no cumulative search and no host sync, so it can run
      inside a CUDA graph. ``generator`` (optional) makes the noise reproducible.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if greedy_only:
        return greedy
    probs = torch.softmax(logits / temperature.clamp_min(1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    above = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None]
    k = torch.where(top_k > 0, top_k, probs.shape[-1])[:, None]
    drop = ((above >= top_p[:, None]) & (ranks > 0)) | (ranks >= k)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    noise = torch.empty_like(sorted_p).exponential_(generator=generator)
    pick = (sorted_p / noise).argmax(dim=-1, keepdim=True)
    sampled = order.gather(-1, pick)[:, 0]
    return torch.where(temperature > 0, sampled, greedy)
