"""Typed configuration. YAML files in ``configs/`` are loaded into these dataclasses;
an unknown key anywhere is an error that names the key and where it was found."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says which key."""


@dataclass
class EndOfTurnConfig:
    """When a pause ends the turn (realtime/endpoint.py). ``silence``: after
    ``vad.silence_duration_ms`` of silence. ``semantic``: at a pause of ``check_ms`` the Smart
    Turn v3 model hears the turn; at P(complete) >= ``threshold`` it ends there, otherwise it
    waits for the user to go on, up to ``max_wait_ms`` of silence. Without the model (not
    installed, still loading, too slow) the silence timer decides."""

    mode: Literal["silence", "semantic"] = "silence"
    check_ms: int = 200  # silence after which the model is asked
    threshold: float = 0.9  # P(complete) that ends the turn at the check (tuned: bench)
    max_wait_ms: int = 1500  # silence that ends a turn the model found incomplete
    model_timeout_ms: int = 1000  # a verdict slower than this is not waited for (silence timer)


@dataclass
class VADConfig:
    aggressiveness: int = 2  # webrtcvad mode 0..3
    frame_ms: int = 20  # 10, 20 or 30
    start_ms: int = 60  # voiced audio needed to declare speech started
    silence_duration_ms: int = 400  # silence that ends a turn
    prefix_padding_ms: int = 300  # audio kept from before speech started
    min_speech_ms: int = 200  # shorter bursts are ignored as noise
    max_turn_s: float = 30.0  # a longer turn is cut and answered
    end_of_turn: EndOfTurnConfig = field(default_factory=EndOfTurnConfig)


BACKCHANNELS = [
    "uh-huh", "uh huh", "uh-uh", "mm-hm", "mm-hmm", "mhm", "mm", "hmm", "hm", "uh", "um", "ah", "oh",
    "okay", "ok", "right", "yeah", "yes", "yep", "sure", "i see", "got it", "alright", "all right",
]  # fmt: skip


@dataclass
class BargeInConfig:
    """What the user's speech does to an answer being spoken (realtime/controller.py,
    realtime/barge_in.py). ``immediate``: any speech stops it. ``hold``: it goes on while the
    speech is judged; it stops as soon as a transcript of it (partial, at a pause, or at its
    end) has ``min_words`` words that are not backchannels from a decode Whisper was sure of
    (``min_avg_logprob``), or when the speech lasts ``min_speech_ms`` whatever its words. A
    backchannel-only or noise burst is neither answered nor put in the engine's history."""

    mode: Literal["immediate", "hold"] = "hold"
    # speech this long (from its start) stops the answer without words: longer than a
    # backchannel ("mm-hm" hummed lasts up to ~1.2 s); words stop it sooner
    min_speech_ms: int = 1500
    min_words: int = 1  # recognised words that are not backchannels, to stop the answer
    # A transcript with more words a second of speech than this is Whisper hearing words in a
    # cough or a hum (it does): it stops nothing.
    max_words_per_s: float = 6.0
    backchannels: list[str] = field(default_factory=lambda: list(BACKCHANNELS))
    # Words from a decode whose mean token log probability is below this are not words (a hum
    # or a cough decoded as "And I'm at camp..."); -1.0 is Whisper's own failed-decode threshold.
    min_avg_logprob: float = -1.0
    # Put before Whisper's prompt while the user speaks over an answer: what a listener says
    # then, so that a hum is written "Mm-hm." rather than as words ("" = no prompt).
    asr_prompt: str = "Mm-hm. Uh-huh. Okay. Right. Yeah."
    # how often the speech over an answer is decoded while it goes on (asr.partial_interval_ms
    # otherwise; counted from the start of the turn's audio, prefix_padding_ms before the speech)
    partial_interval_ms: int = 550


@dataclass
class ASRConfig:
    backend: Literal["faster-whisper", "none"] = "faster-whisper"
    model: str = "tiny.en"  # a name resolved in installed packages, or a directory
    compute_type: str = "int8"
    cpu_threads: int = 2
    beam_size: int = 1
    partial_interval_ms: int = 700  # how often to re-decode while the user speaks
    speculative_after_ms: int = 120  # silence after which the tail is decoded ahead of the endpoint
    # A pause at least this long is a phrase boundary: the words before it are committed and their
    # audio is never decoded again. Shorter gaps (a stop consonant, a breath inside a phrase) are
    # not: a word cut off from its phrase is often misheard ("of | France" -> "friends").
    commit_pause_ms: int = 300
    max_tail_s: float = 8.0  # a tail longer than this is committed at any pause


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 96
    think_budget: int = 0  # max reasoning tokens before the answer is forced
    seed: int = 0


@dataclass
class RemoteLLMConfig:
    """``engine.backend: openai-compatible``: the reply comes from an OpenAI-compatible server
    (vLLM, SGLang, llama.cpp's server, Ollama, a hosted API) through ``POST
    {base_url}/chat/completions`` with ``stream: true``. ``engine.model`` names the served
    model (empty: the first one the server lists at ``GET {base_url}/models``)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str = ""  # sent as "Authorization: Bearer ..."; prefer api_key_env
    api_key_env: str = ""  # the environment variable that holds the key (e.g. OPENAI_API_KEY)
    connect_timeout_s: float = 5.0  # to open the connection
    read_timeout_s: float = 30.0  # the longest wait for the next piece of the answer
    max_connections: int = 256  # kept-alive connections to the server, all sessions together
    # Added to every request body as they are (e.g. {"top_k": 20} or
    # {"chat_template_kwargs": {"enable_thinking": false}} for vLLM).
    extra_body: dict[str, Any] = field(default_factory=dict)
    # How a tool's output goes back: "native" as a ``role: tool`` message answering the call by
    # id (vLLM, SGLang, llama.cpp, hosted APIs); "as_user_text" as a user message "Result of
    # NAME: OUTPUT", for servers whose chat template drops tool messages (llama-cpp-python's
    # chatml-function-calling).
    tool_results: Literal["native", "as_user_text"] = "native"


@dataclass
class EngineConfig:
    backend: Literal["smollm2", "step-audio", "step-audio-random", "openai-compatible"] = "smollm2"
    model: str = ""  # path or hub id; empty = the backend's bundled default
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    threads: int = 2
    cache_dir: str = "~/.cache/realtime-agent"
    max_context: int = 2048
    history_turns: int = 6
    system_prompt: str = (
        "You are a concise, helpful voice assistant. Answer in one or two short spoken "
        "sentences, without lists or markdown."
    )
    speculative: bool = True  # start answering before the endpoint is decided
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Step-Audio only
    listen_chunk_ms: int = 640  # audio encoded and pre-filled per chunk while listening
    exact_encoding: bool = False  # re-encode the whole utterance at the end of speech
    cuda_graphs: bool = True
    # Step-Audio, with cuda_graphs on a GPU: the audio front end, encoder and adapter as CUDA
    # graphs, one per 640 ms of audio up to 25 s (realtime/models/step_audio/encoder_graphs.py).
    encoder_graphs: bool = True
    attention: Literal["auto", "flash_attn", "sdpa"] = "auto"
    max_batch: int = 4
    # Decoder layer weights: as loaded (bf16 on GPU), or FP8 e4m3 with per-channel scales
    # (realtime/models/fp8.py; half the memory and bytes read per step; CPU: emulated, slow).
    weights: Literal["bf16", "fp8"] = "bf16"
    # With weights fp8 only (realtime/engine/step_audio/fp8_setup.py, docs/benchmarks.md):
    # lm_head in FP8 too, and activation scales calibrated once at load ("static") instead
    # of an amax per projection per step ("dynamic"; static clips inputs past 2x calibration's).
    fp8_lm_head: bool = False
    fp8_activations: Literal["dynamic", "static"] = "dynamic"
    # KV cache: one pool of pages shared by all sessions (realtime/models/kv_pages.py); a
    # session takes pages as its context grows (max_context stays its cap) and gives them all
    # back when it ends. Page size: a multiple of 256 for flash-attn's paged path. kv_pages 0:
    # as many as free GPU memory holds (CPU: max_batch sessions at max_context).
    kv_page_size: int = 256
    kv_pages: int = 0
    # An answer's pre-fill (its turn, a history re-fill) runs this many positions at a time,
    # other callers' decode steps in between (realtime/engine/scheduler.py).
    prefill_chunk: int = 256
    # Pieces nobody waits for (listening chunks, the assistant turn of a commit) wait this long
    # at most for a batched pre-fill pass that runs anyway (realtime/engine/scheduler.py).
    prefill_defer_ms: int = 250
    # Step-Audio, one GPU: pieces no lane depends on ride in the decode step's free rows (one
    # read of the weights for both) instead of a pass of their own (scheduler.py). Off until
    # measured on the GPU: the CPU tests check what it computes, not its speed.
    prefill_in_step: bool = False
    # Benchmarks with random weights only: the speaking lane is fed these words' token ids as
    # its next inputs instead of what it samples (same step cost, real words for the TTS).
    forced_answer: str = ""
    # Step-Audio only: the decoder split over this many GPUs (tensor parallel, NCCL; gloo on
    # the CPU); rank 0 is the engine, ranks 1.. worker processes it starts
    # (realtime/engine/step_audio/ranks.py). Must divide the heads and KV heads (R1: 1, 2, 4, 8).
    tensor_parallel: int = 1
    # openai-compatible only
    remote: RemoteLLMConfig = field(default_factory=RemoteLLMConfig)


@dataclass
class TTSConfig:
    backend: Literal["piper", "espeak"] = "piper"
    voice: str = "joe"  # piper voice name found in installed packages, or an .onnx path
    speaking_rate: float = 1.0  # 1.0 = the voice's natural speed
    first_piece_words: int = 3  # release this many words early when no punctuation comes
    max_piece_chars: int = 220
    use_gpu: bool = False  # onnxruntime CUDA provider when available


@dataclass
class AudioConfig:
    output_frame_ms: int = 20  # output is written in frames this long


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_message_bytes: int = 1 << 20
    max_sessions: int = 16
    idle_timeout_s: float = 300.0
    # Access (realtime/server/auth.py): Bearer keys, also from REALTIME_AGENT_API_KEYS; required
    # to serve on anything but loopback. Twilio's auth token (or TWILIO_AUTH_TOKEN) turns on the
    # X-Twilio-Signature check on /twilio.
    api_keys: list[str] = field(default_factory=list)
    twilio_auth_token: str | None = None
    # Limits and shutdown (docs/server.md "Limits"); 0 turns a limit off. idle_timeout_s above
    # is the time without any input; max_message_bytes bounds every message and HTTP body.
    max_sessions_per_key: int = 0  # sessions one API key (its client secrets too) may hold open
    max_session_s: float = 3600.0  # a session is told, then closed, after this long
    max_input_buffer_s: float = 60.0  # Realtime manual turns: audio appended without a commit
    shutdown_drain_s: float = 10.0  # SIGTERM: how long answers in flight may finish
    # Output queue: a WebSocket client (/v1/realtime, /twilio) that stops reading is dropped once
    # this many seconds of answer audio wait unsent for it (realtime/server/bridge.py).
    max_output_queue_s: float = 60.0


@dataclass
class MicConfig:
    """``run_agent.py --mic`` (realtime/transports/mic.py)."""

    # take the agent's own voice, played through the speakers, out of the microphone signal
    # (realtime/echo.py), so that it cannot barge in on itself
    echo_cancellation: bool = True
    noise_suppression: bool = False  # WebRTC's noise suppressor on the microphone too


@dataclass
class TelephonyConfig:
    """Phone calls (realtime/server/twilio.py)."""

    # a key the caller presses also reaches the conversation as user text ("[keypad: 1]"),
    # which the engine reads with the caller's next words
    dtmf_to_engine: bool = True
    # keys pressed and then nothing said for this long: the agent answers the keys alone
    # (0 = keys wait for the caller's next words)
    dtmf_respond_after_s: float = 2.0
    # the answer goes to Twilio in real time, at most this far ahead of what the caller hears
    # (Twilio's play-out buffer, against network jitter): a backchannel then cuts nothing, and
    # an interruption clears at most this much at Twilio; what the server still holds is never
    # sent. 0..1000 ms; the first audio is never delayed
    playout_lead_ms: int = 300

    def __post_init__(self) -> None:
        if not 0 <= self.playout_lead_ms <= 1000:
            raise ConfigError(
                f"telephony.playout_lead_ms: {self.playout_lead_ms} is not within 0..1000 "
                "(a small play-out buffer at Twilio: an interruption judged once the answer "
                "has all gone out cannot take it back)"
            )


@dataclass
class AgentConfig:
    name: str = "embedded"
    audio: AudioConfig = field(default_factory=AudioConfig)
    vad: VADConfig = field(default_factory=VADConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tts: TTSConfig = field(default_factory=TTSConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    mic: MicConfig = field(default_factory=MicConfig)
    telephony: TelephonyConfig = field(default_factory=TelephonyConfig)
    barge_in: BargeInConfig = field(default_factory=BargeInConfig)


T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are rejected by name."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known keys{' of ' + where if where else ''}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    candidate = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if candidate.exists():
        return candidate
    raise ConfigError(f"config file not found: {name_or_path}")


def load_config(
    name_or_path: str | Path = "embedded", overrides: dict[str, Any] | None = None
) -> AgentConfig:
    """Load ``configs/NAME.yaml`` (or a path), then apply dotted ``overrides``."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return from_dict(AgentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
