"""The one place where audio lengths are computed, from 16 kHz samples to LLM embeddings.

    samples --front end--> mel frames (100 Hz) --conv2 stride 2--> 50 Hz
            --average pool 2--> 25 Hz --adapter conv stride 2--> 12.5 Hz (one <audio_patch> each)

The reference front end appends 479 zero samples before a centred STFT and drops the last STFT
frame, so ``n`` samples give ``(n + 479) // 160`` mel frames (10 s: 1002). The reference then
treats the last two of them as padding (``valid = frames - 2``): the encoder masks them out of
attention and the pooled length is ``(valid + 1) // 2 // 2``. 10 s -> 1002 -> 250 -> 125.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE_RATE = 16000
HOP = 160
PAD_SAMPLES = 479  # appended by the reference front end before the STFT
PAD_FRAMES = 2  # mel frames the reference counts as padding
CHUNK_SECONDS = 25  # the reference encodes audio in independent pieces of at most 25 s
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
ADAPTER_PADDING = 1


@dataclass(frozen=True)
class AudioLengths:
    mel_frames: int  # 100 Hz frames the front end yields (with the padding frames)
    valid_mel_frames: int  # frames the encoder attends to
    encoder_frames: int  # 50 Hz conv2 outputs (tensor length, padding included)
    pooled_frames: int  # 25 Hz encoder outputs that are valid
    embeddings: int  # 12.5 Hz adapter outputs = number of <audio_patch> tokens


def audio_lengths(mel_frames: int, kernel_size: int = 3, adapter_stride: int = 2) -> AudioLengths:
    """Length arithmetic for one piece of audio of ``mel_frames`` 100 Hz frames."""
    if mel_frames < 0:
        raise ValueError(f"negative number of mel frames: {mel_frames}")
    valid = max(mel_frames - PAD_FRAMES, 0)
    encoder = (mel_frames - 1) // 2 + 1 if mel_frames > 0 else 0
    pooled = (valid + 1) // 2 // 2
    if pooled == 0:
        embeddings = 0
    else:
        embeddings = (pooled + 2 * ADAPTER_PADDING - kernel_size) // adapter_stride + 1
    return AudioLengths(mel_frames, valid, encoder, pooled, max(embeddings, 0))


def mel_frames_for_samples(n_samples: int) -> int:
    return (n_samples + PAD_SAMPLES) // HOP


def embeddings_for_samples(n_samples: int, kernel_size: int = 3, adapter_stride: int = 2) -> int:
    return audio_lengths(mel_frames_for_samples(n_samples), kernel_size, adapter_stride).embeddings


def chunk_spans(n_samples: int, chunk: int = CHUNK_SAMPLES) -> list[tuple[int, int]]:
    """``[start, end)`` of the independent pieces (25 s each) a long utterance is encoded in.

    A last piece too short to give one embedding (under 20 ms) is dropped.
    """
    spans = [(s, min(s + chunk, n_samples)) for s in range(0, n_samples, chunk)]
    return [(s, e) for s, e in spans if embeddings_for_samples(e - s) > 0]
