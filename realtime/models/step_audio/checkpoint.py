"""Loading a Step-Audio-R1 / Step-Audio 2 checkpoint directory.

Layout: ``config.json``, ``model.safetensors.index.json`` + the shards it lists (or one
``model.safetensors``), ``tokenizer.json`` (``tokenizer_config.json`` optional), and optionally
``generation_config.json``, whose ``eos_token_id`` are stop ids (so are ``config.json``'s, at
the top level or in ``text_config``; ``<|EOT|>`` always is). Every shard's
header is checked first (names, shapes, the index) so that a broken checkpoint fails in seconds
with a message naming the file and the tensor; then the tensors are read shard by shard with
``safe_open(device=...)`` straight to the target device and copied into parameters that were
allocated there in the target dtype (bf16 on GPU). No host copy of the whole model is made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from realtime.models.step_audio.config import CheckpointError, StepAudioConfig
from realtime.models.step_audio.model import StepAudioModel, build_empty, full_tensors
from realtime.models.step_audio.tokens import SpecialTokens, TextTokenizer
from realtime.models.tensor_parallel import local_config, shard_slice

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py"]
# tensors some exporters write that the model computes itself: skipped, not an error
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    config: Path
    shards: tuple[Path, ...]
    weight_map: dict[str, str]  # tensor name -> shard file name (empty without an index)
    index: Path | None


@dataclass
class LoadedStepAudio:
    model: StepAudioModel
    tokenizer: TextTokenizer
    special: SpecialTokens
    config: StepAudioConfig
    files: CheckpointFiles
    load_s: float


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        value = getattr(torch, str(dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


# ---- locating the files ------------------------------------------------------------------
def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ) not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = (
        url.hostname or "huggingface.co",
        url.port or (443 if url.scheme == "https" else 80),
    )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id resolved through ``huggingface_hub`` (from its
    cache, else downloaded when the hub can be reached)."""
    if not name_or_path:
        raise CheckpointError("no model given: pass --model PATH (a checkpoint directory)")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"model path {path} is a file, expected a checkpoint directory")
    if not _looks_like_hub_id(name_or_path):
        raise CheckpointError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name_or_path!r} is not a local directory and huggingface_hub is not installed"
        ) from None
    cache = str(Path(cache_dir).expanduser()) if cache_dir else None
    try:
        return Path(snapshot_download(name_or_path, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (any reason): try the network below
        pass
    if not _hub_reachable():
        raise CheckpointError(
            f"model {name_or_path!r} is not a local directory and not in the hub cache, and the "
            "hub cannot be reached (offline). Download it where there is network "
            f"(`huggingface-cli download {name_or_path} --local-dir DIR`) and pass --model DIR"
        )
    try:
        return Path(snapshot_download(name_or_path, cache_dir=cache, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - report whatever the hub said
        raise CheckpointError(f"cannot download {name_or_path!r} from the hub: {exc}") from None


def find_checkpoint_files(root: str | Path) -> CheckpointFiles:
    root = Path(root)
    config = root / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"missing file {CONFIG_FILE} in {root}")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text())
            weight_map = dict(data["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
        names = sorted(set(weight_map.values()))
        for n in names:
            if not (root / n).is_file():
                raise CheckpointError(f"missing shard file {n} in {root} (listed in {INDEX_FILE})")
        return CheckpointFiles(root, config, tuple(root / n for n in names), weight_map, index)
    single = root / SINGLE_FILE
    if single.is_file():
        return CheckpointFiles(root, config, (single,), {}, None)
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        raise CheckpointError(
            f"missing file {INDEX_FILE} in {root} (found {len(shards)} shard(s) but no index)"
        )
    raise CheckpointError(f"missing weights in {root}: neither {INDEX_FILE} nor {SINGLE_FILE}")


def load_tokenizer(root: Path) -> TextTokenizer:
    if (root / TOKENIZER_FILE).is_file():
        return TextTokenizer.from_dir(root)
    if (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
        try:  # slow-tokenizer files only: let transformers build the fast one
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(root))
            return TextTokenizer(tok.backend_tokenizer, str(root / "vocab.json"))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"missing file {TOKENIZER_FILE} in {root}, and vocab.json/merges.txt could not "
                f"be converted: {exc}"
            ) from None
    raise CheckpointError(f"missing file {TOKENIZER_FILE} in {root}")


def checkpoint_eos_ids(root: Path) -> tuple[int, ...]:
    """End-of-sequence ids the checkpoint lists: ``eos_token_id`` (an id or a list of ids) of
    ``generation_config.json`` and of ``config.json`` (top level, then ``text_config``), in
    that order, without repeats. Absent files and keys add nothing."""
    found: list[int] = []
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        file = root / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: the top level must be a JSON object")
        sections = [("", data)]
        if isinstance(data.get("text_config"), dict):
            sections.append(("text_config.", data["text_config"]))
        for prefix, section in sections:
            value = section.get("eos_token_id")
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise CheckpointError(
                    f"{file}: {prefix}eos_token_id must be a token id or a list of token ids, "
                    f"not {value!r}"
                )
            found.extend(ids)
    return tuple(dict.fromkeys(found))


# ---- the weights -------------------------------------------------------------------------
def _safe_open(path: Path, device: str) -> object:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise CheckpointError(
            f"shard {path.name} cannot be read as safetensors (truncated or corrupt?): {exc}"
        ) from None


def check_headers(files: CheckpointFiles, expected: dict[str, torch.Tensor]) -> dict[str, Path]:
    """Names and shapes of every shard against the model (no tensor data is read).
    Returns tensor name -> shard path."""
    where: dict[str, Path] = {}
    for shard in files.shards:
        with _safe_open(shard, "cpu") as f:  # type: ignore[attr-defined]
            for key in f.keys():
                if key in where:
                    raise CheckpointError(
                        f"tensor {key} is in two shards: {where[key].name} and {shard.name}"
                    )
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                where[key] = shard
                if key not in expected:
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                want = tuple(expected[key].shape)
                if shape != want:
                    raise CheckpointError(
                        f"shape mismatch for tensor {key} in {shard.name}: checkpoint {list(shape)}"
                        f", model {list(want)} (does config.json match the weights?)"
                    )
    tied = "lm_head.weight" not in expected  # tie_word_embeddings: a saved copy is redundant
    unexpected = sorted(
        k for k in set(where) - set(expected) if not (tied and k == "lm_head.weight")
    )
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]} in {where[unexpected[0]].name}{more}: "
            "not a Step-Audio checkpoint, or config.json does not match the weights"
        )
    missing = sorted(set(expected) - set(where))
    if missing:
        listed = files.weight_map.get(missing[0])
        hint = f" (the index lists it in {listed})" if listed else ""
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{hint}{more} in {files.root}")
    for key, shard in files.weight_map.items():
        if key in where and where[key].name != shard:
            raise CheckpointError(
                f"{INDEX_FILE} lists tensor {key} in {shard}, but it is in {where[key].name}"
            )
        if key not in where and not key.endswith(IGNORED_SUFFIXES):
            raise CheckpointError(f"{INDEX_FILE} lists tensor {key} in {shard}, which lacks it")
    return where


@torch.no_grad()
def load_weights(model: StepAudioModel, files: CheckpointFiles) -> None:
    expected = model.checkpoint_tensors()
    check_headers(files, expected)
    device = model.device
    dev = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    for shard in files.shards:
        with _safe_open(shard, dev) as f:  # type: ignore[attr-defined]
            for key in f.keys():
                if key not in expected:
                    continue  # ignored (checked above)
                try:
                    t = f.get_tensor(key)
                except Exception as exc:  # noqa: BLE001
                    raise CheckpointError(
                        f"tensor {key} in {shard.name} cannot be read (truncated?): {exc}"
                    ) from None
                expected[key].copy_(t)
                del t


@torch.no_grad()
def load_shard_weights(
    targets: dict[str, torch.Tensor],
    files: CheckpointFiles,
    full: dict[str, torch.Tensor],
    rank: int,
    world: int,
    device: torch.device,
) -> None:
    """Tensor parallel: fill ``targets`` (checkpoint name -> one rank's tensor) with rank
    ``rank``'s part of each (``tensor_parallel.shard_slice``), read as a safetensors slice so
    that no rank reads a whole split matrix. ``full``: the whole model's tensors (shapes, for
    the header check; meta tensors do)."""
    check_headers(files, full)
    dev = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    for shard in files.shards:
        with _safe_open(shard, dev) as f:  # type: ignore[attr-defined]
            for key in f.keys():
                if key not in targets:
                    continue  # another rank's (the encoder), or ignored (checked above)
                idx = shard_slice(key, tuple(full[key].shape), rank, world)
                try:
                    t = f.get_slice(key)[idx]
                except Exception as exc:  # noqa: BLE001
                    raise CheckpointError(
                        f"tensor {key} in {shard.name} cannot be read (truncated?): {exc}"
                    ) from None
                targets[key].copy_(t)
                del t


def load_step_audio(
    name_or_path: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    cache_dir: str | None = None,
    check_known_tokens: bool = True,
    world: int = 1,
) -> LoadedStepAudio:
    """Load config, tokenizer and weights of a Step-Audio-R1 / Step-Audio 2 checkpoint; with
    ``world`` > 1, rank 0's part of it (``sharded.py``: its decoder shard; ``config`` stays
    the whole model's)."""
    t0 = time.perf_counter()
    root = resolve_model_path(name_or_path, cache_dir)
    files = find_checkpoint_files(root)
    cfg = StepAudioConfig.from_file(files.config)
    tokenizer = load_tokenizer(root)
    special = SpecialTokens.from_tokenizer(tokenizer, check_known=check_known_tokens)
    # an id the model cannot emit never stops it: such a listed id is dropped, not an error
    eos = tuple(i for i in checkpoint_eos_ids(root) if i < cfg.text.vocab_size)
    special = dataclasses.replace(special, eos_ids=eos)
    for name, i in (("<audio_patch>", special.audio_patch), ("<|EOT|>", special.eot)):
        if i >= cfg.text.vocab_size:
            raise CheckpointError(
                f"{name} has id {i}, outside the model's vocab_size {cfg.text.vocab_size}"
            )
    dev = resolve_device(device)
    if world > 1:  # decoder shard 0 of ``world`` (tensor parallel), the whole encoder
        local = dataclasses.replace(cfg, text=local_config(cfg.text, world))
        model = build_empty(local, dev, resolve_dtype(dtype, dev))
        load_shard_weights(model.checkpoint_tensors(), files, full_tensors(cfg), 0, world, dev)
    else:
        model = build_empty(cfg, dev, resolve_dtype(dtype, dev))
        load_weights(model, files)
    model.audio_patch_id = special.audio_patch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return LoadedStepAudio(model, tokenizer, special, cfg, files, time.perf_counter() - t0)
