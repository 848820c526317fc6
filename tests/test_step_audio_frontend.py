"""The log-mel front end against the reference algorithm (torch.stft) and its normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realtime.models.step_audio.frontend import LogMel, mel_filterbank
from realtime.models.step_audio.lengths import mel_frames_for_samples

LOGMEL = LogMel("cpu")


def _reference_raw(x: np.ndarray) -> torch.Tensor:
    """The reference recipe written out with torch.stft: pad 479, centred STFT, drop last."""
    a = torch.nn.functional.pad(torch.from_numpy(x).double(), (0, 479))
    window = torch.hann_window(400, dtype=torch.float64)
    spec = torch.stft(a, 400, 160, window=window, return_complex=True)[..., :-1]
    mel = mel_filterbank().double() @ spec.abs() ** 2
    return torch.clamp(mel, min=1e-10).log10().float()


def _audio(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (t < 0.5)
    return (tone + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_filterbank_matches_transformers_slaney() -> None:
    audio_utils = pytest.importorskip("transformers.audio_utils")
    ref = audio_utils.mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=128,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = mel_filterbank()
    assert ours.shape == (128, 201)
    np.testing.assert_allclose(ours.numpy(), ref.T, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("n", [0, 1, 199, 200, 201, 359, 360, 4000, 16000, 160000])
def test_whole_piece_matches_reference_stft(n: int) -> None:
    x = _audio(n, seed=n)
    ours = LOGMEL.raw(x)
    ref = _reference_raw(x)
    assert ours.shape == ref.shape == (128, mel_frames_for_samples(n))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_ten_seconds_give_1002_frames_and_normalisation() -> None:
    x = _audio(160000)
    mel = LOGMEL(x)
    assert mel.shape == (128, 1002)
    raw = LOGMEL.raw(x)
    # floor at max - 8, then (x + 4) / 4
    assert float(mel.min()) == pytest.approx((float(raw.max()) - 8 + 4) / 4, abs=1e-6)
    assert float(mel.max()) == pytest.approx((float(raw.max()) + 4) / 4, abs=1e-6)
    silent = LOGMEL(np.zeros(16000, dtype=np.float32))
    assert torch.allclose(silent, torch.full_like(silent, (-10 + 4) / 4))


def test_int16_input_is_scaled() -> None:
    x = _audio(4000)
    as_int = np.round(x * 32767).astype(np.int16)
    torch.testing.assert_close(LOGMEL.raw(as_int), LOGMEL.raw(as_int / 32768.0), atol=1e-5, rtol=0)
