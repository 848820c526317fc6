"""16 kHz log-mel front end (128 bins, window 400, hop 160, Whisper normalisation), in torch.

What the reference (Step-Audio 2 ``log_mel_spectrogram(audio, padding=479)``) computes:
append 479 zero samples, take a centred STFT (``torch.stft(center=True)``: 200 samples of
reflection padding on each side) with a Hann window, drop the last frame, project the power
spectrum on a Slaney mel filterbank, ``log10(max(mel, 1e-10))``, floor at ``max - 8`` over the
whole piece, then ``(x + 4) / 4``.

How the 479-sample padding is handled here, without ever calling ``torch.stft``: frame ``i`` is
samples ``[160 i - 200, 160 i + 200)`` of the audio, where indices below 0 are the reflection
(``x[-k] = x[k]``) and indices at or beyond the end are zeros (the 479 appended zeros, and the
end reflection, which only ever reflects those zeros because 479 > 200). There are
``(n + 479) // 160`` frames. The global ``max - 8`` floor needs the whole piece, so the raw
log10 frames (:meth:`LogMel.raw`) are normalised afterwards by :func:`normalize_log_mel`. The
spectrum is computed in float64 and rounded to float32 at the end so that the result does not
depend on how many frames are computed together.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from realtime.models.step_audio.lengths import HOP, PAD_SAMPLES, SAMPLE_RATE, mel_frames_for_samples

N_FFT = 400
N_MELS = 128
HALF = N_FFT // 2  # reflection padding of a centred STFT
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    mel = f / f_sp
    log_part = min_log_hz / f_sp + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` Slaney-normalised triangular filters, 0 Hz to sr / 2
    (the same matrix as ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)``)."""
    fft_freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(sr / 2.0)), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)
    widths = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def as_pcm_tensor(pcm: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """1-D float audio in [-1, 1] (int16 is scaled) as a float64 tensor on ``device``."""
    if isinstance(pcm, np.ndarray):
        if pcm.dtype == np.int16:
            pcm = pcm.astype(np.float32) / 32768.0
        t = torch.from_numpy(np.ascontiguousarray(pcm))
    else:
        t = pcm
    if t.dim() != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float64)


def normalize_log_mel(raw: torch.Tensor) -> torch.Tensor:
    """Whisper normalisation of raw log10 frames: floor at ``max - 8``, then ``(x + 4) / 4``."""
    max_value = raw.max() if raw.numel() else torch.tensor(math.log10(LOG_FLOOR))
    floor = torch.as_tensor(max_value, dtype=raw.dtype, device=raw.device) - DYNAMIC_RANGE
    return (torch.maximum(raw, floor) + 4.0) / 4.0


class LogMel:
    """The front end on one device: ``LogMel(device)(pcm) -> [128, frames]`` float32."""

    def __init__(self, device: torch.device | str = "cpu", n_mels: int = N_MELS) -> None:
        self.device = torch.device(device)
        self.n_mels = n_mels
        self.filters = mel_filterbank(n_mels).to(self.device, torch.float64)
        self.window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64).to(self.device)

    def raw(self, pcm: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw log10 mel ``[n_mels, (n + 479) // 160]`` of a whole piece."""
        x = as_pcm_tensor(pcm, self.device)
        n_frames = mel_frames_for_samples(x.shape[0])
        ext = torch.cat([x, x.new_zeros(PAD_SAMPLES + HALF)])
        padded = torch.cat([ext[1 : HALF + 1].flip(0), ext])
        windows = padded.unfold(0, N_FFT, HOP)[:n_frames] * self.window
        spec = torch.fft.rfft(windows, dim=-1)
        power = spec.real.square() + spec.imag.square()
        mel = power @ self.filters.T
        return torch.clamp(mel, min=LOG_FLOOR).log10().T.to(torch.float32)

    def __call__(self, pcm: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised log mel of a whole piece (at most 25 s in the reference)."""
        return normalize_log_mel(self.raw(pcm))
