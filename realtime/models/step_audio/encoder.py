"""Whisper-style audio encoder of Step-Audio 2 / R1 (state-dict prefix ``encoder.``).

Names as in the checkpoint: ``conv1``, ``conv2`` (stride 2), ``positional_embedding``
(an embedding table ``[n_audio_ctx, n_audio_state]``), ``blocks.N.attn.{query,key,value,out}``
(``key`` has no bias), ``blocks.N.attn_ln``, ``blocks.N.mlp.{0,2}``, ``blocks.N.mlp_ln``, then
``avg_pooler`` (no weights) and ``after_norm``. Attention is bidirectional over the piece; the
reference masks the keys of the two padding mel frames (see ``lengths.py``), reproduced here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from realtime.models.step_audio.config import AudioEncoderConfig


class EncoderAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape
        shape = (b, t, self.n_head, c // self.n_head)
        q = self.query(x).view(shape).transpose(1, 2)
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        # the reference scales q and k by d^-1/4 each: the usual 1/sqrt(d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = EncoderAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(
            nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state)
        )
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), key_mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.n_audio_state
        self.conv1 = nn.Conv1d(cfg.n_mels, s, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(s, s, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(cfg.n_audio_ctx, s)
        self.blocks = nn.ModuleList(
            EncoderBlock(s, cfg.n_audio_head) for _ in range(cfg.n_audio_layer)
        )
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(s)

    def forward(
        self,
        mel: torch.Tensor,
        valid_frames: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel [B, n_mels, T]`` (100 Hz), ``valid_frames [B]`` (default ``frames - 2``, the
        reference's padding rule) -> ``([B, T2 // 2, n_state]`` at 25 Hz, valid lengths ``[B]``).

        ``frames [B]``: each row's true mel length when ``mel`` is zero-padded past it (a
        fixed-shape input, as the encoder's CUDA graphs take): everything computed from the
        padding is zeroed or masked, so a row's states up to its own length equal an unpadded
        run's. Nothing here reads a device value on the host: no synchronisation."""
        b, _, t = mel.shape
        dev = mel.device
        padded = frames is not None
        if frames is None:
            frames = torch.full((b,), t, device=dev, dtype=torch.long)
        if valid_frames is None:
            valid_frames = frames - 2
        valid_frames = valid_frames.to(dev).clamp(min=1)
        t2 = (t - 1) // 2 + 1
        if t2 > self.cfg.n_audio_ctx:
            raise ValueError(
                f"{t} mel frames give {t2} encoder positions, more than n_audio_ctx "
                f"{self.cfg.n_audio_ctx} (encode at most 30 s at a time)"
            )
        if padded:  # conv1 and conv2 must see zeros past the end, as their own padding gives
            inside = (torch.arange(t, device=dev)[None, :] < frames[:, None])[:, None, :]
            x = F.gelu(self.conv1(mel * inside)) * inside
        else:
            x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # [B, T2, C]
        x = x + self.positional_embedding.weight[:t2].to(x.dtype)
        # conv2 output j sits on mel frame (T + 1) % 2 + 2 j: valid iff that frame is valid
        frame = ((frames + 1) % 2)[:, None] + 2 * torch.arange(t2, device=dev)[None, :]
        key_mask = (frame < valid_frames[:, None])[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.after_norm(self.avg_pooler(x.transpose(1, 2)).transpose(1, 2))
        if padded:  # the adapter must see zeros past the pooled frames of an unpadded run
            pooled = ((frames - 1) // 2 + 1) // 2
            x = x * (torch.arange(x.shape[1], device=dev)[None, :] < pooled[:, None])[..., None]
        return x, (valid_frames + 1) // 2 // 2
