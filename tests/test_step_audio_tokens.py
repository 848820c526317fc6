"""Step-Audio tokens: incremental detokenisation, and the stop ids a checkpoint lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from step_audio_fixtures import write_tiny_checkpoint

from realtime.models.step_audio.checkpoint import checkpoint_eos_ids, load_step_audio
from realtime.models.step_audio.config import CheckpointError
from realtime.models.step_audio.random_tokenizer import random_tokenizer
from realtime.models.step_audio.tokens import SpecialTokens


def test_the_random_backends_tokenizer_has_the_step_audio_special_tokens() -> None:
    tok = random_tokenizer()
    sp = SpecialTokens.from_tokenizer(tok, check_known=True)  # as build_step_audio_engine does
    assert (sp.eot, sp.audio_start, sp.audio_patch) == (151665, 151688, 151690)
    assert sp.think_open is not None and sp.think_close is not None
    assert len(tok.encode("assistant")) == 1 and tok.decode(tok.encode("héllo")) == "héllo"


def test_streamed_text_equals_the_whole_decode() -> None:
    tok = random_tokenizer()
    text = "Grüße, 世界! naïve café — 🙂 <think>hmm</think> ok<|EOT|>"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert "" in pieces  # tokens that end inside a character give nothing yet...
    assert not any("\ufffd" in p for p in pieces)  # ...and then the whole character
    assert pieces[ids.index(151665)] == "<|EOT|>"  # special tokens are kept as text
    late = tok.stream()
    assert late.push(999_999) == "" and late.push(ids[0]) == text[0]  # unknown ids: nothing


def _json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data))


def test_eos_ids_from_generation_config_and_config(tmp_path: Path) -> None:
    assert checkpoint_eos_ids(tmp_path) == ()  # neither file
    _json(tmp_path / "generation_config.json", {"eos_token_id": [151643, 151665]})
    _json(tmp_path / "config.json", {"eos_token_id": 151645, "text_config": {"eos_token_id": 7}})
    assert checkpoint_eos_ids(tmp_path) == (151643, 151665, 151645, 7)
    _json(tmp_path / "generation_config.json", {"eos_token_id": 151665})  # one id, no list
    _json(tmp_path / "config.json", {"text_config": {"eos_token_id": [151665, 151643]}})
    assert checkpoint_eos_ids(tmp_path) == (151665, 151643)
    _json(tmp_path / "generation_config.json", {"eos_token_id": "<|EOT|>"})
    with pytest.raises(CheckpointError, match=r"generation_config\.json: eos_token_id"):
        checkpoint_eos_ids(tmp_path)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint_eos_ids(tmp_path)


def test_stop_ids_put_eot_first_without_repeats() -> None:
    sp = SpecialTokens(1, 151665, 3, 4, 5, eos_ids=(151643, 151665, 151643, 151645))
    assert sp.stop_ids == (151665, 151643, 151645)
    assert SpecialTokens(1, 151665, 3, 4, 5).stop_ids == (151665,)


def test_a_loaded_checkpoint_stops_where_its_configs_say(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt")  # Step-Audio-R1's ids: 151643 and 151665
    assert load_step_audio(str(path), device="cpu").special.stop_ids == (151665, 151643)
    _json(path / "generation_config.json", {"eos_token_id": [151665, 10**7]})
    # an id beyond the vocabulary can never be sampled: dropped
    assert load_step_audio(str(path), device="cpu").special.stop_ids == (151665,)
    (path / "generation_config.json").unlink()
    assert load_step_audio(str(path), device="cpu").special.stop_ids == (151665,)
