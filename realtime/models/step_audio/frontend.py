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
``(n + 479) // 160`` frames. :class:`StreamingMel` emits frame ``i`` as soon as sample
``160 i + 199`` has arrived; the frames that reach into the padding are emitted by ``finish()``.

The global ``max - 8`` floor needs the whole piece, so the streaming form yields the *raw*
log10 frames (before normalisation), which are exactly those of the whole-piece form for any
chunking; :func:`normalize_log_mel` is elementwise and is applied with the maximum seen so far
(exact once the piece has ended). The spectrum is computed in float64 and rounded to float32 at
the end so that the result does not depend on how many frames are computed together.
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


def normalize_log_mel(
    raw: torch.Tensor, max_value: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Whisper normalisation of raw log10 frames: floor at ``max - 8``, then ``(x + 4) / 4``."""
    if max_value is None:
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

    def frames_from_padded(self, padded: torch.Tensor, n_frames: int) -> torch.Tensor:
        """Raw log10 mel of frames ``0..n_frames-1`` of an already padded signal."""
        if n_frames <= 0:
            return torch.empty(self.n_mels, 0, device=self.device)
        windows = padded.unfold(0, N_FFT, HOP)[:n_frames] * self.window
        spec = torch.fft.rfft(windows, dim=-1)
        power = spec.real.square() + spec.imag.square()
        mel = power @ self.filters.T
        return torch.clamp(mel, min=LOG_FLOOR).log10().T.to(torch.float32)

    def raw(self, pcm: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw log10 mel ``[n_mels, (n + 479) // 160]`` of a whole piece."""
        x = as_pcm_tensor(pcm, self.device)
        n = x.shape[0]
        ext = torch.cat([x, x.new_zeros(PAD_SAMPLES + HALF)])
        padded = torch.cat([ext[1 : HALF + 1].flip(0), ext])
        return self.frames_from_padded(padded, mel_frames_for_samples(n))

    def __call__(self, pcm: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalised log mel of a whole piece (at most 25 s in the reference)."""
        return normalize_log_mel(self.raw(pcm))

    def streaming(self) -> StreamingMel:
        return StreamingMel(self)


class StreamingMel:
    """Raw log-mel frames as audio arrives; the frames equal ``LogMel.raw`` of the whole piece.

    ``push(pcm)`` returns the frames completed by this audio (``[n_mels, k]``, k may be 0),
    ``finish()`` the last ones (which reach into the padding). ``normalized()`` gives every frame
    so far normalised with the maximum so far; after ``finish()`` it equals ``LogMel(pcm)``.
    """

    def __init__(self, logmel: LogMel) -> None:
        self.logmel = logmel
        self.n_samples = 0
        self.n_frames = 0
        self.finished = False
        self._head: list[torch.Tensor] = []  # audio before the reflection can be built
        self._buf: torch.Tensor | None = None  # padded signal from sample 160 * n_frames on
        self._frames: list[torch.Tensor] = []
        self._max: torch.Tensor | None = None  # on the device: no host sync per push

    @property
    def max_value(self) -> float:
        return -math.inf if self._max is None else float(self._max)

    def push(self, pcm: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.finished:
            raise RuntimeError("StreamingMel.push after finish()")
        x = as_pcm_tensor(pcm, self.logmel.device)
        self.n_samples += x.shape[0]
        if self._buf is None:
            self._head.append(x)
            if self.n_samples <= HALF:  # the reflection needs sample 200
                return self._empty()
            audio = torch.cat(self._head)
            self._head = []
            self._buf = torch.cat([audio[1 : HALF + 1].flip(0), audio])
        else:
            self._buf = torch.cat([self._buf, x])
        # frame i is complete once padded sample 160 i + 399 is known
        ready = (HALF + self.n_samples - N_FFT) // HOP + 1 - self.n_frames
        return self._emit(max(ready, 0))

    def finish(self) -> torch.Tensor:
        if self.finished:
            return self._empty()
        self.finished = True
        if self._buf is None:
            audio = torch.cat(self._head) if self._head else self._zeros(0)
            ext = torch.cat([audio, self._zeros(PAD_SAMPLES + HALF)])
            self._buf = torch.cat([ext[1 : HALF + 1].flip(0), ext])
            self._head = []
        else:
            self._buf = torch.cat([self._buf, self._zeros(PAD_SAMPLES + HALF)])
        return self._emit(mel_frames_for_samples(self.n_samples) - self.n_frames)

    def frames(self) -> torch.Tensor:
        """Every raw frame emitted so far, ``[n_mels, n_frames]``."""
        return torch.cat(self._frames, dim=1) if self._frames else self._empty()

    def normalized(self) -> torch.Tensor:
        return normalize_log_mel(self.frames(), self._max)

    def _emit(self, k: int) -> torch.Tensor:
        assert self._buf is not None
        if k <= 0:
            return self._empty()
        out = self.logmel.frames_from_padded(self._buf, k)
        self.n_frames += k
        self._buf = self._buf[k * HOP :]
        self._frames.append(out)
        m = out.max()
        self._max = m if self._max is None else torch.maximum(self._max, m)
        return out

    def _empty(self) -> torch.Tensor:
        return torch.empty(self.logmel.n_mels, 0, device=self.logmel.device)

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64, device=self.logmel.device)
