"""The native Step-Audio-R1 / Step-Audio 2 model: front end, audio encoder, adapter, prompt,
checkpoint loading, on top of the project's own Qwen2.5 decoder (``realtime.models.qwen2``)."""

from realtime.models.step_audio.checkpoint import LoadedStepAudio, load_step_audio
from realtime.models.step_audio.config import CheckpointError, StepAudioConfig
from realtime.models.step_audio.lengths import audio_lengths, embeddings_for_samples
from realtime.models.step_audio.model import StepAudioModel, random_step_audio

__all__ = [
    "CheckpointError",
    "LoadedStepAudio",
    "StepAudioConfig",
    "StepAudioModel",
    "audio_lengths",
    "embeddings_for_samples",
    "load_step_audio",
    "random_step_audio",
]
