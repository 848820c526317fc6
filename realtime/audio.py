"""Audio conversion at the pipeline's edges: any rate, any channel count -> 16 kHz mono on the
way in, the answer's audio -> each transport's rate on the way out (``StreamResampler``).

Resampling is done by soxr (libsoxr), file and frame decoding by PyAV (FFmpeg), so any common
format (wav, flac, mp3, ogg, m4a) at any rate is accepted.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import soxr

if TYPE_CHECKING:
    from av import AudioFrame

PIPELINE_RATE = 16000
MIN_RATE = 8000
MAX_RATE = 192000


class AudioFormatError(ValueError):
    """Audio that cannot be used: wrong shape, dtype, rate, or not audio at all."""


def to_float32(pcm: np.ndarray) -> np.ndarray:
    """int16/int32/uint8/float input -> float32 in [-1, 1]."""
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    if pcm.dtype == np.int32:
        return (pcm.astype(np.float64) / 2147483648.0).astype(np.float32)
    if pcm.dtype == np.uint8:
        return (pcm.astype(np.float32) - 128.0) / 128.0
    if pcm.dtype in (np.float32, np.float64):
        return pcm.astype(np.float32, copy=False)
    raise AudioFormatError(f"unsupported sample type {pcm.dtype}; use int16 or float32")


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """float in [-1, 1] (clipped) or any integer type -> int16."""
    if pcm.dtype == np.int16:
        return pcm
    if np.issubdtype(pcm.dtype, np.floating):
        return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)
    return pcm.astype(np.int16)


def downmix(pcm: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) -> (n,). Channels are averaged."""
    if pcm.ndim == 1:
        return pcm
    if pcm.ndim == 2:
        if pcm.shape[1] > 16 and pcm.shape[0] <= 16:
            raise AudioFormatError(
                f"audio of shape {pcm.shape} looks channels-first; pass (samples, channels)"
            )
        return pcm.mean(axis=1, dtype=np.float32)
    raise AudioFormatError(f"audio must be 1-D or (samples, channels), got shape {pcm.shape}")


def resample(pcm: np.ndarray, rate_in: int, rate_out: int, quality: str = "HQ") -> np.ndarray:
    """Whole-buffer resampling of mono audio (float in [-1, 1], or int16); the dtype is kept.
    ``quality`` is a soxr quality name ("QQ", "LQ", "MQ", "HQ", "VHQ")."""
    if rate_in <= 0 or rate_out <= 0:
        raise AudioFormatError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    if pcm.ndim != 1:
        raise AudioFormatError(f"expected mono audio, got shape {pcm.shape}")
    if rate_in == rate_out or pcm.size == 0:
        return pcm
    out = soxr.resample(to_float32(pcm), rate_in, rate_out, quality)
    return to_int16(out) if pcm.dtype == np.int16 else out


def check_rate(sample_rate: int) -> None:
    if not isinstance(sample_rate, (int, np.integer)) or not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioFormatError(
            f"unsupported sample rate {sample_rate!r}; expected {MIN_RATE}..{MAX_RATE} Hz"
        )


class StreamResampler:
    """Streaming resampling of one audio stream to ``out_rate`` mono, as ``dtype``.

    Input may be any supported sample type, mono or (samples, channels) (downmixed); float
    input must be finite. soxr's state is kept between chunks, so chunked output equals
    whole-buffer output up to the filter delay, which ``last=True`` flushes. The input rate is
    fixed by ``in_rate`` or given per call; a new rate starts a fresh stream. Equal rates pass
    through unfiltered.
    """

    def __init__(
        self,
        out_rate: int = PIPELINE_RATE,
        *,
        in_rate: int | None = None,
        dtype: npt.DTypeLike = np.float32,
        quality: str = "HQ",
    ) -> None:
        check_rate(out_rate)
        if in_rate is not None:
            check_rate(in_rate)
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.int16)):
            raise AudioFormatError(f"output dtype must be float32 or int16, got {dtype}")
        self.out_rate = out_rate
        self.in_rate = in_rate
        self.dtype = np.dtype(dtype)
        self.quality = quality
        self._stream: soxr.ResampleStream | None = None

    def __call__(self, pcm: np.ndarray, rate: int | None = None, last: bool = False) -> np.ndarray:
        rate = self.in_rate if rate is None else rate
        if rate is None:
            raise AudioFormatError("no input sample rate: pass in_rate or rate")
        if rate != self.in_rate or (self._stream is None and rate != self.out_rate):
            check_rate(rate)
            self.in_rate = rate
            self._stream = (
                None
                if rate == self.out_rate
                else soxr.ResampleStream(
                    rate, self.out_rate, 1, dtype=self.dtype.name, quality=self.quality
                )
            )
        x = self._prepare(pcm)
        if self._stream is None:
            return x
        out = self._stream.resample_chunk(x, last=last)
        if last:
            self._stream = None  # flushed: a following chunk starts a fresh stream
        return out

    def _prepare(self, pcm: np.ndarray) -> np.ndarray:
        if not isinstance(pcm, np.ndarray):
            raise AudioFormatError(f"audio must be a numpy array, got {type(pcm).__name__}")
        if pcm.ndim == 2 and pcm.shape[1] == 1:
            pcm = pcm[:, 0]
        if self.dtype == np.int16 and pcm.dtype == np.int16 and pcm.ndim == 1:
            return pcm  # the common server case: int16 mono in and out, untouched
        x = downmix(to_float32(pcm))
        if not np.all(np.isfinite(x)):
            raise AudioFormatError("audio contains NaN or infinite samples")
        return x if self.dtype == np.float32 else to_int16(x)

    def reset(self) -> None:
        """Drop the filter state (e.g. after an interruption): the next chunk starts afresh."""
        self._stream = None


class InputConverter(StreamResampler):
    """One input stream at ``sample_rate`` -> 16 kHz mono float32 (the pipeline's input)."""

    def __init__(self, sample_rate: int, out_rate: int = PIPELINE_RATE) -> None:
        super().__init__(out_rate, in_rate=sample_rate, dtype=np.float32)
        self.sample_rate = sample_rate

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:  # type: ignore[override]
        return super().__call__(pcm, last=last)


@dataclass
class AudioFile:
    pcm: np.ndarray  # float32 mono at sample_rate (as decoded, before conversion)
    sample_rate: int
    channels: int
    path: Path

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


def read_audio(path: str | Path) -> AudioFile:
    """Decode an audio file to float32 mono at its own rate, with clear errors."""
    p = Path(path)
    if not p.exists():
        raise AudioFormatError(f"input file not found: {p}")
    if p.is_dir():
        raise AudioFormatError(f"input is a directory, not an audio file: {p}")
    if p.stat().st_size == 0:
        raise AudioFormatError(f"input file is empty: {p}")
    try:
        return _read_with_av(p)
    except AudioFormatError:
        raise
    except Exception as exc:  # PyAV raises many error types for non-audio input
        raise AudioFormatError(f"cannot decode {p} as audio: {exc}") from None


def _read_with_av(p: Path) -> AudioFile:
    import av  # imported here: only file input needs FFmpeg

    with av.open(str(p)) as container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise AudioFormatError(f"{p} has no audio stream")
        stream = streams[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        channels = int(stream.codec_context.channels or 1)
        pieces: list[np.ndarray] = []
        for frame in container.decode(stream):
            pieces.append(downmix(to_float32(av_frame_to_array(frame))))
    if not pieces:
        raise AudioFormatError(f"{p} holds no audio samples")
    check_rate(rate)
    return AudioFile(np.concatenate(pieces).astype(np.float32), rate, channels, p)


def av_frame_to_array(frame: AudioFrame) -> np.ndarray:
    """A decoded PyAV audio frame -> (n,) (mono) or (n, channels) samples, as int16, int32,
    uint8 or float32 (FFmpeg's sample format, planar or packed, mapped to the numpy type)."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    arr = arr.T if frame.format.is_planar else arr.reshape(-1, channels)
    fmt = frame.format.name.rstrip("p")
    dtype = {"s16": np.int16, "s32": np.int32, "u8": np.uint8}.get(fmt, np.float32)
    arr = arr.astype(dtype, copy=False)
    return arr[:, 0] if channels == 1 else arr


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write mono 16-bit PCM wav."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = to_int16(pcm if pcm.dtype == np.int16 else to_float32(pcm))
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(data.tobytes())
