"""Audio-to-LLM adapter (state-dict prefix ``adapter.``): 25 Hz encoder states -> 12.5 Hz
LLM embeddings. ``conv`` (kernel 3, stride 2, padding 1) + GELU, ``linear1`` (-> 2048), ReLU,
``linear2`` (-> the LLM width)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from realtime.models.step_audio.config import AudioEncoderConfig

ADAPTER_HIDDEN = 2048  # fixed in the reference, not a config key


class AudioAdapter(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        s = cfg.n_audio_state
        self.conv = nn.Conv1d(s, s, cfg.kernel_size, cfg.adapter_stride, padding=1)
        self.linear1 = nn.Linear(s, ADAPTER_HIDDEN)
        self.linear2 = nn.Linear(ADAPTER_HIDDEN, cfg.llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, n_audio_state]`` -> ``[B, (T - 1) // 2 + 1, llm_dim]``."""
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.linear2(F.relu(self.linear1(x)))
