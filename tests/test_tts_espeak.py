from __future__ import annotations

import shutil

import numpy as np
import pytest

from realtime.config import TTSConfig
from tts import espeak_backend
from tts.espeak_backend import EspeakHead, EspeakUnavailableError, espeak_synthesize

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="no espeak-ng")


@needs_espeak
def test_espeak_speaks() -> None:
    audio, rate = espeak_synthesize("Hello there, this is the fallback voice.")
    assert rate == 22050
    assert 1.0 < audio.size / rate < 5.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.02


@needs_espeak
async def test_espeak_head_streams() -> None:
    head = EspeakHead(TTSConfig(backend="espeak", voice="joe"))  # a Piper name: default voice
    assert head.default_voice == "en-us" and "en-gb" in head.voices()
    stream = head.open_stream(voice="en-gb", speaking_rate=1.2, output_rate=8000)
    stream.push_text("Hi, it costs $3.50.")
    stream.finish()
    chunks = [c async for c in stream.chunks()]
    assert {c.sample_rate for c in chunks} == {8000}
    assert sum(c.pcm.size for c in chunks) / 8000 > 1.0
    assert [c.text for c in chunks if c.text] == ["Hi,", " it costs $3.50."]
    with pytest.raises(ValueError):
        head.open_stream(voice="no-such-voice")
    assert 0.5 < EspeakHead(output_rate=16000).synthesize("Hello there.").size / 16000 < 3.0


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(espeak_backend.shutil, "which", lambda name: None)
    with pytest.raises(EspeakUnavailableError, match="apt-get install espeak-ng"):
        EspeakHead()


def test_load_tts_falls_back_to_espeak_without_piper(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from tts import load_tts

    real_import = builtins.__import__

    def no_piper(name: str, *args: object, **kw: object) -> object:
        if name == "piper":
            raise ImportError("no piper")
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_piper)
    if shutil.which("espeak-ng") is None:
        pytest.skip("no espeak-ng")
    assert load_tts(TTSConfig(backend="piper")).name == "espeak"
