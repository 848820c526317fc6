"""Special tokens of the Step-Audio 2 / R1 vocabulary and a thin tokenizer wrapper.

Ids are always read from the checkpoint's tokenizer by name. The public code fixes a few of
them, which are checked when ``check_known`` is on: ``<|EOT|>`` = 151665 (the serving stop id),
``<audio_start>`` = 151688 (the reference inserts audio after it), ``<audio_patch>`` = 151690;
text ids are below 151688 and speech tokens ``<audio_N>`` are ``151696 + N`` (6561 = padding).
Generation stops at ``<|EOT|>`` and at every end-of-sequence id the checkpoint lists
(Step-Audio-R1's ``generation_config.json``: 151643 ``<|endoftext|>`` and 151665).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realtime.models.step_audio.config import CheckpointError

BOT = "<|BOT|>"
EOT = "<|EOT|>"
AUDIO_START = "<audio_start>"
AUDIO_END = "<audio_end>"
AUDIO_PATCH = "<audio_patch>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TTS_START = "<tts_start>"
TTS_END = "<tts_end>"

KNOWN_IDS = {EOT: 151665, AUDIO_START: 151688, AUDIO_PATCH: 151690}
TEXT_ID_LIMIT = 151688  # ids below this are text
SPEECH_TOKEN_OFFSET = 151696  # <audio_0>
SPEECH_PAD = 6561

REQUIRED = (BOT, EOT, AUDIO_START, AUDIO_END, AUDIO_PATCH)


def is_speech_token(token_id: int) -> bool:
    return token_id >= SPEECH_TOKEN_OFFSET


class TextTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library (no transformers needed)."""

    def __init__(self, tokenizer: object, source: str = "") -> None:
        self._tok = tokenizer
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"missing file tokenizer.json in {path}")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions
            raise CheckpointError(f"{file}: cannot be read as a tokenizer: {exc}") from None
        return cls(tok, str(file))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=False))  # type: ignore[attr-defined]

    def stream(self) -> TextStream:
        """Incremental decoding of one growing token sequence (see :class:`TextStream`)."""
        return TextStream(self._tok)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)  # type: ignore[attr-defined, no-any-return]

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)  # type: ignore[attr-defined, no-any-return]


class TextStream:
    """Text of a token sequence as it grows, without re-decoding it at every token
    (``tokenizers.decoders.DecodeStream``). ``push(id)`` returns the text that ``id`` completes:
    ``""`` while it ends inside a character (one UTF-8 character may take several byte-level
    tokens), then the whole character. The pieces add up to ``decode(ids)``; special tokens are
    kept as text, as :meth:`TextTokenizer.decode` keeps them."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""


@dataclass(frozen=True)
class SpecialTokens:
    bot: int
    eot: int
    audio_start: int
    audio_end: int
    audio_patch: int
    think_open: int | None = None
    think_close: int | None = None
    eos_ids: tuple[int, ...] = ()  # end-of-sequence ids the checkpoint's configs list

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """``<|EOT|>`` first, then the checkpoint's other end-of-sequence ids."""
        return (self.eot, *(i for i in dict.fromkeys(self.eos_ids) if i != self.eot))

    @classmethod
    def from_tokenizer(cls, tok: TextTokenizer, check_known: bool = True) -> SpecialTokens:
        ids: dict[str, int] = {}
        for name in REQUIRED:
            i = tok.token_to_id(name)
            if i is None:
                raise CheckpointError(f"{tok.source or 'tokenizer'}: missing special token {name}")
            if check_known and name in KNOWN_IDS and i != KNOWN_IDS[name]:
                raise CheckpointError(
                    f"{tok.source or 'tokenizer'}: {name} has id {i}, the Step-Audio "
                    f"vocabulary has it at {KNOWN_IDS[name]}"
                )
            ids[name] = i
        return cls(
            bot=ids[BOT],
            eot=ids[EOT],
            audio_start=ids[AUDIO_START],
            audio_end=ids[AUDIO_END],
            audio_patch=ids[AUDIO_PATCH],
            think_open=tok.token_to_id(THINK_OPEN),
            think_close=tok.token_to_id(THINK_CLOSE),
        )


def eos_from_tokenizer_config(path: str | Path) -> str | None:
    """The ``eos_token`` named in ``tokenizer_config.json`` (informational)."""
    file = Path(path) / "tokenizer_config.json"
    if not file.is_file():
        return None
    eos = json.loads(file.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None
