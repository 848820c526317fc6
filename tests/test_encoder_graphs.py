"""The encoder's fixed-shape (padded) path, the one its CUDA graphs capture, run eagerly on the
CPU: it must give what an unpadded encoding gives, whatever the length and whatever the
buffer held before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from step_audio_fixtures import write_tiny_checkpoint

from realtime.engine.step_audio.encoding import encode_piece
from realtime.models.step_audio.checkpoint import LoadedStepAudio, load_step_audio
from realtime.models.step_audio.encoder_graphs import BUCKET_SAMPLES, EncoderGraphs
from realtime.models.step_audio.lengths import CHUNK_SAMPLES, mel_frames_for_samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedStepAudio:
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return load_step_audio(str(path), device="cpu", dtype=torch.float32)


def _speech(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(n)).astype(np.float32)


# lengths: under a bucket, exactly one, one sample past it, odd and even mel frame counts,
# the growing windows' multiples of 640 ms, and a whole 25 s piece
LENGTHS = [400, 3300, 5000, BUCKET_SAMPLES, BUCKET_SAMPLES + 1, 3 * BUCKET_SAMPLES,
           26011, 26171, CHUNK_SAMPLES]  # fmt: skip


@pytest.mark.parametrize("n", LENGTHS)
def test_padded_encoding_equals_the_unpadded_one(tiny: LoadedStepAudio, n: int) -> None:
    pcm = _speech(n, seed=n)
    graphs = EncoderGraphs(tiny.model)
    ours = graphs.encode(pcm)
    ref = encode_piece(tiny.model, pcm)
    assert ours is not None and ours.shape == ref.shape and ref.shape[0] > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_odd_and_even_frame_counts_are_both_covered() -> None:
    assert {mel_frames_for_samples(n) % 2 for n in LENGTHS} == {0, 1}


def test_what_a_longer_piece_left_in_the_buffer_is_not_read(tiny: LoadedStepAudio) -> None:
    graphs = EncoderGraphs(tiny.model, bucket=1600)
    graphs.encode(_speech(5 * 1600, seed=2) * 8)
    short = _speech(2 * 1600 + 7, seed=3)
    ours = graphs.encode(short)
    torch.testing.assert_close(ours, encode_piece(tiny.model, short), rtol=1e-4, atol=1e-5)


def test_a_piece_longer_than_the_largest_bucket_is_left_to_the_caller(
    tiny: LoadedStepAudio,
) -> None:
    graphs = EncoderGraphs(tiny.model, max_samples=3 * 1600, bucket=1600)
    assert graphs.sizes == [1600, 3200, 4800]
    assert graphs.encode(_speech(4801)) is None
    assert graphs.encode(_speech(4800)) is not None


def test_capture_needs_cuda(tiny: LoadedStepAudio) -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        EncoderGraphs(tiny.model).capture()


def test_the_benchmark_runs_and_finds_the_paths_equal(tmp_path) -> None:  # noqa: ANN001
    from bench.gpu_encoder import main

    out = main(["--tiny", "--runs", "1", "--out", str(tmp_path / "enc.json")])
    assert [r["embeddings"] for r in out["rows"]][-1] == 312  # 24.96 s
    assert all(r["rel_l2"] < 1e-4 for r in out["rows"])
    assert (tmp_path / "enc.json").exists()
