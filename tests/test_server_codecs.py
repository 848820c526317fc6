"""G.711 (PyAV) against the reference (``audioop``, still in Python 3.11), and PCM helpers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from realtime.audio import StreamResampler
from realtime.server import codecs

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # Python 3.13+
        audioop = None

ALL = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.skipif(audioop is None, reason="audioop (the reference) is gone in Python 3.13+")
def test_decode_bit_exact_with_audioop() -> None:
    every = bytes(range(256))
    assert codecs.ulaw_decode(every).tobytes() == audioop.ulaw2lin(every, 2)
    assert codecs.alaw_decode(every).tobytes() == audioop.alaw2lin(every, 2)


@pytest.mark.skipif(audioop is None, reason="audioop (the reference) is gone in Python 3.13+")
@pytest.mark.parametrize(
    ("enc", "dec", "ref", "most_differ"),
    [
        (codecs.ulaw_encode, codecs.ulaw_decode, "lin2ulaw", 512),
        (codecs.alaw_encode, codecs.alaw_decode, "lin2alaw", 964),
    ],
)
def test_encode_matches_audioop_up_to_edge_rounding(enc, dec, ref, most_differ) -> None:  # type: ignore[no-untyped-def]
    """FFmpeg rounds some samples at a step's edge to the next level where the ITU reference
    truncates: the codes equal audioop's except for a known few, each one level away."""
    ours = np.frombuffer(enc(ALL), np.uint8)
    theirs = np.frombuffer(getattr(audioop, ref)(ALL.tobytes(), 2), np.uint8)
    assert ours.size == ALL.size
    differ = ours != theirs
    assert differ.sum() <= most_differ
    levels = np.unique(dec(bytes(range(256))))
    ours_level = np.searchsorted(levels, dec(ours.tobytes()))
    theirs_level = np.searchsorted(levels, dec(theirs.tobytes()))
    assert np.abs(ours_level - theirs_level).max() == 1


@pytest.mark.parametrize(
    ("enc", "dec"),
    [(codecs.ulaw_encode, codecs.ulaw_decode), (codecs.alaw_encode, codecs.alaw_decode)],
)
def test_round_trip_error_is_small(enc, dec) -> None:  # type: ignore[no-untyped-def]
    t = np.arange(8000) / 8000
    pcm = (12000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    back = dec(enc(pcm)).astype(np.float64)
    snr = 10 * np.log10(np.mean(pcm.astype(np.float64) ** 2) / np.mean((back - pcm) ** 2))
    assert snr > 30  # G.711 gives about 38 dB on a loud tone
    assert dec(enc(np.zeros(10, np.int16))).max() <= 8  # silence stays silent
    assert enc(np.zeros(0, np.int16)) == b"" and dec(b"").size == 0


def test_pcm_helpers_reject_bad_input() -> None:
    with pytest.raises(codecs.AudioDecodeError, match="base64"):
        codecs.b64decode_strict("not base64!")
    with pytest.raises(codecs.AudioDecodeError, match="even number"):
        codecs.pcm16_from_bytes(b"\x00\x01\x02")
    pcm = np.array([0, 1, -1, 32767, -32768], np.int16)
    data = codecs.b64decode_strict(codecs.pcm16_to_b64(pcm))
    assert np.array_equal(codecs.pcm16_from_bytes(data), pcm)


def test_stream_resampler_keeps_length_across_chunks() -> None:
    rs = StreamResampler(8000, dtype=np.int16)
    pcm = np.zeros(24000, np.int16)
    out = [rs(pcm[i : i + 480], 24000) for i in range(0, len(pcm), 480)]
    assert all(o.dtype == np.int16 for o in out)
    total = sum(len(o) for o in out)
    assert 8000 - 400 < total <= 8000  # soxr holds back a few ms (its filter delay)
    same = StreamResampler(24000, dtype=np.int16)
    assert np.array_equal(same(pcm[:480], 24000), pcm[:480])
