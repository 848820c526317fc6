"""Loading a Step-Audio checkpoint: the real layout round-trips, broken ones fail by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from step_audio_fixtures import write_tiny_checkpoint

from realtime.models.step_audio.checkpoint import (
    find_checkpoint_files,
    load_step_audio,
    resolve_model_path,
)
from realtime.models.step_audio.config import CheckpointError, StepAudioConfig

LAYER_SHARD = "model-00002-of-00003.safetensors"
HEAD_SHARD = "model-00003-of-00003.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("good"), seed=7)


@pytest.fixture
def ckpt(good: Path, tmp_path: Path) -> Path:
    """A fresh copy of the good checkpoint to break."""
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def _edit_config(path: Path, fn) -> None:  # type: ignore[no-untyped-def]
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_shard(path: Path, shard: str, fn) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path / shard))
    fn(tensors)
    save_file(tensors, str(path / shard))


def test_round_trip_same_tensors_and_layout(good: Path) -> None:
    loaded = load_step_audio(str(good), device="cpu", dtype=torch.float32)
    index = json.loads((good / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({*index.values()}) == 3
    names = set(loaded.model.checkpoint_tensors())
    assert names == set(index)
    for prefix in (
        "model.embed_tokens.",
        "model.layers.0.self_attn.q_proj.",
        "lm_head.",
        "encoder.conv1.",
        "encoder.positional_embedding.",
        "encoder.after_norm.",
        "encoder.blocks.0.attn.key.",
        "encoder.blocks.0.mlp.2.",
        "adapter.linear1.",
    ):
        assert any(n.startswith(prefix) for n in names), prefix
    tensors = loaded.model.checkpoint_tensors()
    for shard in sorted(set(index.values())):
        with safe_open(str(good / shard), framework="pt") as f:
            for key in f.keys():
                saved = f.get_tensor(key)
                assert saved.dtype == torch.bfloat16
                assert torch.equal(tensors[key], saved.float()), key
    assert loaded.model.dtype == torch.float32
    assert loaded.config.audio.n_audio_state == 16 and loaded.config.text.vocab_size == 151700
    bf16 = load_step_audio(str(good), device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    assert torch.equal(
        bf16.model.decoder.lm_head.weight, loaded.model.decoder.lm_head.weight.bfloat16()
    )


def test_missing_shard_is_named(ckpt: Path) -> None:
    (ckpt / LAYER_SHARD).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file {LAYER_SHARD}"):
        load_step_audio(str(ckpt), device="cpu")


def test_missing_tensor_is_named(ckpt: Path) -> None:
    _rewrite_shard(ckpt, LAYER_SHARD, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=rf"missing tensor model.layers.1.mlp.up_proj.weight .*{LAYER_SHARD}"
    ):
        load_step_audio(str(ckpt), device="cpu")


def test_wrong_shape_is_named(ckpt: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight"] = t["model.norm.weight"][:31].clone()

    _rewrite_shard(ckpt, HEAD_SHARD, shrink)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch for tensor model.norm.weight .*\[31\]"
    ):
        load_step_audio(str(ckpt), device="cpu")


def test_unexpected_tensor_is_named(ckpt: Path) -> None:
    def add(t: dict[str, torch.Tensor]) -> None:
        t["encoder.extra_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)

    _rewrite_shard(ckpt, "model-00001-of-00003.safetensors", add)
    with pytest.raises(CheckpointError, match="unexpected tensor encoder.extra_proj.weight"):
        load_step_audio(str(ckpt), device="cpu")


def test_config_that_does_not_match_the_weights(ckpt: Path) -> None:
    _edit_config(ckpt, lambda c: c["text_config"].update(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2"):
        load_step_audio(str(ckpt), device="cpu")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("text_config", "hidden_size"),
        ("text_config", "vocab_size"),
        ("audio_encoder_config", "n_audio_layer"),
        ("audio_encoder_config", "llm_dim"),
    ],
)
def test_missing_config_key_is_named(ckpt: Path, section: str, key: str) -> None:
    _edit_config(ckpt, lambda c: c[section].pop(key))
    with pytest.raises(CheckpointError, match=rf"{section}: missing config key '{key}'"):
        load_step_audio(str(ckpt), device="cpu")


def test_missing_config_section_and_wrong_architecture(ckpt: Path) -> None:
    _edit_config(ckpt, lambda c: c.pop("audio_encoder_config"))
    with pytest.raises(CheckpointError, match="missing config key 'audio_encoder_config'"):
        load_step_audio(str(ckpt), device="cpu")
    _edit_config(ckpt, lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"))
    with pytest.raises(CheckpointError, match="not a Step-Audio checkpoint"):
        load_step_audio(str(ckpt), device="cpu")


def test_flat_text_config_is_accepted(good: Path) -> None:
    cfg = json.loads((good / "config.json").read_text())
    flat = {**cfg, **cfg.pop("text_config")}
    parsed = StepAudioConfig.from_dict(flat)
    assert (
        parsed.text
        == StepAudioConfig.from_dict(json.loads((good / "config.json").read_text())).text
    )


def test_truncated_shard_is_named(ckpt: Path) -> None:
    data = (ckpt / HEAD_SHARD).read_bytes()
    (ckpt / HEAD_SHARD).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{HEAD_SHARD}.*(truncated|corrupt)"):
        load_step_audio(str(ckpt), device="cpu")


def test_garbage_shard_header_is_named(ckpt: Path) -> None:
    (ckpt / LAYER_SHARD).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=f"shard {LAYER_SHARD} cannot be read"):
        load_step_audio(str(ckpt), device="cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("config.json", "missing file config.json"),
        ("tokenizer.json", "missing file tokenizer.json"),
        ("model.safetensors.index.json", "missing file model.safetensors.index.json"),
    ],
)
def test_missing_files_are_named(ckpt: Path, name: str, message: str) -> None:
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_step_audio(str(ckpt), device="cpu")


def test_tokenizer_without_a_special_token(ckpt: Path) -> None:
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<audio_patch>"]
    tok["model"]["vocab"].pop("<audio_patch>")
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="missing special token <audio_patch>"):
        load_step_audio(str(ckpt), device="cpu")


def test_single_file_checkpoint(ckpt: Path) -> None:
    files = find_checkpoint_files(ckpt)
    merged: dict[str, torch.Tensor] = {}
    for shard in files.shards:
        merged.update(load_file(str(shard)))
        shard.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    save_file(merged, str(ckpt / "model.safetensors"))
    loaded = load_step_audio(str(ckpt), device="cpu")
    assert loaded.files.index is None and len(loaded.files.shards) == 1


def test_paths_and_offline_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="no model given"):
        resolve_model_path("")
    with pytest.raises(CheckpointError, match="model directory not found"):
        resolve_model_path(str(tmp_path / "nope"))
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="hub cannot be reached .offline."):
        resolve_model_path("stepfun-ai/Step-Audio-R1", cache_dir=str(tmp_path / "hub"))


def test_rotary_buffer_is_ignored_and_index_must_match(ckpt: Path) -> None:
    def add(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    _rewrite_shard(ckpt, LAYER_SHARD, add)
    load_step_audio(str(ckpt), device="cpu")
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = LAYER_SHARD
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lists tensor model.norm.weight in {LAYER_SHARD}"):
        load_step_audio(str(ckpt), device="cpu")
