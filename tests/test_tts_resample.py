from __future__ import annotations

import numpy as np
import pytest

from tts.resample import TRANSPORT_RATES, resample


def tone(rate: int, hz: float = 440.0, seconds: float = 0.5) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


@pytest.mark.parametrize("to_rate", sorted(TRANSPORT_RATES.values()))
def test_rates_lengths_and_pitch(to_rate: int) -> None:
    out = resample(tone(22050), 22050, to_rate)
    assert out.dtype == np.float32
    assert abs(out.size - to_rate // 2) <= 2
    assert peak_hz(out, to_rate) == pytest.approx(440, abs=4)


def test_int16_stays_int16() -> None:
    pcm = (tone(22050) * 32767).astype(np.int16)
    out = resample(pcm, 22050, 48000)
    assert out.dtype == np.int16
    assert abs(int(np.abs(out).max()) - 16383) < 600


def test_same_rate_and_bad_input() -> None:
    x = tone(16000)
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError):
        resample(x, 0, 16000)
    with pytest.raises(ValueError):
        resample(np.zeros((2, 10), np.float32), 16000, 8000)
