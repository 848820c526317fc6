import wave

import numpy as np
import pytest

from realtime.audio import (
    AudioFormatError,
    InputConverter,
    StreamResampler,
    av_frame_to_array,
    read_audio,
    resample,
    write_wav,
)


def tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000])
def test_any_rate_becomes_16k_mono_in_chunks(rate):
    x = tone(rate)
    stereo = np.stack([x, x], axis=1)
    conv = InputConverter(rate)
    step = max(1, rate // 50)
    out = np.concatenate(
        [conv(stereo[i : i + step], last=i + step >= len(x)) for i in range(0, len(x), step)]
    )
    assert abs(len(out) - 16000) <= 2
    # the 440 Hz tone survives: its spectral peak is where it should be
    spec = np.abs(np.fft.rfft(out[2000:14000]))
    peak_hz = np.argmax(spec) * 16000 / 12000
    assert abs(peak_hz - 440) < 3
    whole = resample(x, rate, 16000)
    n = min(len(whole), len(out))
    assert np.max(np.abs(whole[200 : n - 200] - out[200 : n - 200])) < 2e-3


def test_int16_input_and_bad_inputs():
    conv = InputConverter(16000)
    out = conv(np.array([0, 16384, -32768], dtype=np.int16))
    assert out.dtype == np.float32 and out[1] == pytest.approx(0.5) and out[2] == -1.0
    with pytest.raises(AudioFormatError, match="sample type"):
        conv(np.zeros(10, dtype=np.complex64))
    with pytest.raises(AudioFormatError, match="NaN"):
        conv(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(AudioFormatError, match="sample rate"):
        InputConverter(4000)
    with pytest.raises(AudioFormatError, match="1-D"):
        conv(np.zeros((2, 2, 2), np.float32))


def test_read_audio_reports_clear_errors(tmp_path):
    with pytest.raises(AudioFormatError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioFormatError, match="empty"):
        read_audio(empty)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio at all " * 50)
    with pytest.raises(AudioFormatError, match="cannot decode|no audio"):
        read_audio(text)
    with pytest.raises(AudioFormatError, match="directory"):
        read_audio(tmp_path)


def test_read_stereo_44k_wav(tmp_path):
    x = tone(44100, 0.5)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes((np.stack([x, x], 1) * 32767).astype(np.int16).tobytes())
    f = read_audio(path)
    assert f.sample_rate == 44100 and f.channels == 2
    assert abs(f.duration_s - 0.5) < 0.01
    assert np.max(np.abs(f.pcm - x)) < 1e-3


def test_write_wav_round_trip(tmp_path):
    x = tone(22050, 0.2)
    write_wav(tmp_path / "o.wav", x, 22050)
    f = read_audio(tmp_path / "o.wav")
    assert f.sample_rate == 22050 and np.max(np.abs(f.pcm - x)) < 1e-3


def test_av_frame_to_array_packed_planar_and_mono():
    import av

    x = (tone(16000, 0.02) * 32767).astype(np.int16)
    stereo = np.stack([x, -x], axis=1)
    packed = av.AudioFrame.from_ndarray(stereo.reshape(1, -1), format="s16", layout="stereo")
    planar_samples = np.ascontiguousarray(stereo.T, dtype=np.float32) / 32768
    planar = av.AudioFrame.from_ndarray(planar_samples, format="fltp", layout="stereo")
    mono = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="s16", layout="mono")
    assert av_frame_to_array(packed).dtype == np.int16
    assert np.array_equal(av_frame_to_array(packed), stereo)
    assert av_frame_to_array(planar).dtype == np.float32
    assert np.allclose(av_frame_to_array(planar), stereo / 32768)
    assert np.array_equal(av_frame_to_array(mono), x)


def test_stream_resampler_int16_rate_changes_and_flush():
    rs = StreamResampler(8000, dtype=np.int16)
    x = (tone(24000, 0.5) * 32767).astype(np.int16)
    head = np.concatenate([rs(x[i : i + 480], 24000) for i in range(0, len(x), 480)])
    tail = rs(np.zeros(0, np.int16), 24000, last=True)
    assert head.dtype == tail.dtype == np.int16
    assert len(head) + len(tail) == 4000  # the flush gives back exactly the held-back delay
    assert abs(int(np.abs(head).max()) - 16383) < 600
    # another input rate starts a fresh stream; a float input is converted, stereo downmixed
    y = rs(np.stack([tone(16000, 0.5)] * 2, axis=1), 16000, last=True)
    assert y.dtype == np.int16 and len(y) == 4000
    with pytest.raises(AudioFormatError, match="no input sample rate"):
        StreamResampler(16000)(x)
    with pytest.raises(AudioFormatError, match="sample rate"):
        rs(x, 1000)
