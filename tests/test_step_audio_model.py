"""Step-Audio model on a tiny checkpoint: length arithmetic, encoder, merge, prompt, generation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from step_audio_fixtures import tiny_config, write_tiny_checkpoint

from realtime.engine.parser import ReasoningParser
from realtime.models.layers import rope_inv_freq
from realtime.models.step_audio.checkpoint import LoadedStepAudio, load_step_audio
from realtime.models.step_audio.config import step_audio_r1_config
from realtime.models.step_audio.lengths import (
    audio_lengths,
    chunk_spans,
    embeddings_for_samples,
    mel_frames_for_samples,
)
from realtime.models.step_audio.model import (
    AudioCountError,
    StepAudioModel,
    build_empty,
    random_step_audio,
)
from realtime.models.step_audio.prompt import (
    AudioSlot,
    Conversation,
    Message,
    PromptBuilder,
    Turn,
    audio_slots,
)
from realtime.models.step_audio.tokens import TextTokenizer

CHAIN = ("\n", "hmm", "</think>", "Hi", "!")  # forced continuation of "...<think>\n"


def _force_chain(model: StepAudioModel, tok: TextTokenizer) -> None:
    """Silence attention and MLP outputs so the next token depends on the current one only,
    then wire CHAIN[k] -> CHAIN[k + 1] -> ... -> <|EOT|> through embeddings and lm_head."""
    dec = model.decoder
    for layer in dec.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    ids = [tok.encode(t) for t in CHAIN]
    assert all(len(i) == 1 for i in ids), ids
    chain = [i[0] for i in ids] + [tok.token_to_id("<|EOT|>")]
    emb, head = dec.model.embed_tokens.weight, dec.lm_head.weight
    for k in range(len(CHAIN)):
        emb[chain[k]] = 0.0
        emb[chain[k], k] = 10.0
        head[chain[k + 1], k] = 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedStepAudio:
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), modify=_force_chain)
    return load_step_audio(str(path), device="cpu", dtype=torch.float32)


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


# ---- lengths -----------------------------------------------------------------------------
def test_ten_seconds_give_125_embeddings() -> None:
    lens = audio_lengths(mel_frames_for_samples(160000))
    assert (lens.mel_frames, lens.valid_mel_frames) == (1002, 1000)
    assert (lens.encoder_frames, lens.pooled_frames, lens.embeddings) == (501, 250, 125)
    assert embeddings_for_samples(160000) == 125
    assert embeddings_for_samples(25 * 16000) == 313  # one full reference piece
    assert embeddings_for_samples(0) == 0 and embeddings_for_samples(320) == 0
    assert embeddings_for_samples(321) == 1  # the shortest audio that gives one embedding


def test_long_audio_is_cut_in_25s_pieces() -> None:
    assert chunk_spans(60 * 16000) == [(0, 400000), (400000, 800000), (800000, 960000)]
    assert chunk_spans(400000 + 100) == [(0, 400000)]  # a tail under 20 ms gives nothing
    assert [s.n_embeddings for s in audio_slots(60 * 16000)] == [313, 313, 125]


@pytest.mark.parametrize("seconds", [0.1, 0.37, 1.0, 2.03, 3.3, 0.3, 0.31, 0.32])
def test_arithmetic_matches_the_modules(tiny: LoadedStepAudio, seconds: float) -> None:
    model = tiny.model
    mel = model.logmel(_speech(seconds))
    lens = audio_lengths(mel.shape[1])
    with torch.inference_mode():
        states, valid = model.encoder(mel[None], torch.tensor([lens.valid_mel_frames]))
        out = model.adapter(states)
    assert int(valid[0]) == lens.pooled_frames <= states.shape[1] <= lens.pooled_frames + 1
    assert lens.embeddings <= out.shape[1] <= lens.embeddings + 1
    assert lens.encoder_frames == (mel.shape[1] - 1) // 2 + 1
    assert model.encode_audio(_speech(seconds)).shape == (lens.embeddings, 32)


# ---- encoder against the reference formulation --------------------------------------------
def _reference_encoder(model: StepAudioModel, mel: torch.Tensor, valid: int) -> torch.Tensor:
    """Encoder written the reference's way: q and k scaled by d^-1/4, additive -1e10 key mask."""
    enc = model.encoder
    t = mel.shape[-1]
    x = F.gelu(enc.conv1(mel[None]))
    x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
    keep = (torch.arange(t) < valid)[(t + 1) % 2 :: 2]
    bias = (1.0 - keep.float()) * -1e10
    x = x + enc.positional_embedding.weight[: x.shape[1]]
    for blk in enc.blocks:
        h = blk.attn_ln(x)
        a = blk.attn
        n = a.n_head
        d = h.shape[-1] // n
        q = a.query(h).view(1, -1, n, d).permute(0, 2, 1, 3) * d**-0.25
        k = a.key(h).view(1, -1, n, d).permute(0, 2, 3, 1) * d**-0.25
        v = a.value(h).view(1, -1, n, d).permute(0, 2, 1, 3)
        w = torch.softmax(q @ k + bias, dim=-1)
        x = x + a.out((w @ v).permute(0, 2, 1, 3).flatten(2))
        x = x + blk.mlp(blk.mlp_ln(x))
    x = F.avg_pool1d(x.permute(0, 2, 1), 2, 2).permute(0, 2, 1)
    return enc.after_norm(x)[0]


@pytest.mark.parametrize("seconds", [0.3, 0.5, 0.51, 1.23])
def test_encoder_matches_reference_formulation(tiny: LoadedStepAudio, seconds: float) -> None:
    model = tiny.model
    mel = model.logmel(_speech(seconds, seed=3))
    valid = mel.shape[1] - 2
    with torch.inference_mode():
        ours, _ = model.encoder(mel[None], torch.tensor([valid]))
        ref = _reference_encoder(model, mel, valid)
    torch.testing.assert_close(ours[0], ref, rtol=1e-4, atol=1e-5)
    # whole path as the reference: adapter over all pooled frames, keep the valid embeddings
    n_emb = audio_lengths(mel.shape[1]).embeddings
    with torch.inference_mode():
        ref_emb = model.adapter(ref[None])[0, :n_emb]
    torch.testing.assert_close(model.encode_mel(mel), ref_emb, rtol=1e-4, atol=1e-5)
    # the mask is live: attending to the two padding frames changes the valid outputs
    with torch.inference_mode():
        unmasked, _ = model.encoder(mel[None], torch.tensor([mel.shape[1]]))
    n = audio_lengths(mel.shape[1]).pooled_frames
    assert not torch.allclose(unmasked[0, :n], ours[0, :n])
    assert ours.shape[1] in (n, n + 1)


# ---- merge -------------------------------------------------------------------------------
def test_embed_replaces_audio_patches_in_order(tiny: LoadedStepAudio) -> None:
    model, sp = tiny.model, tiny.special
    ids = torch.tensor(
        [[sp.bot, 5, sp.audio_start, sp.audio_patch, sp.audio_patch, sp.audio_end, 7]]
    )
    audio = torch.randn(2, 32)
    with torch.inference_mode():
        out = model.embed(ids, audio)
        plain = model.decoder.embed(ids)
    assert out.shape == (1, 7, 32)
    torch.testing.assert_close(out[0, 3], audio[0])
    torch.testing.assert_close(out[0, 4], audio[1])
    keep = [0, 1, 2, 5, 6]
    torch.testing.assert_close(out[0, keep], plain[0, keep])
    with pytest.raises(AudioCountError, match="2 <audio_patch> tokens .* 3 audio embeddings"):
        model.embed(ids, torch.randn(3, 32))
    with pytest.raises(AudioCountError, match="2 <audio_patch> tokens .* 0 audio"):
        model.embed(ids)


# ---- prompt ------------------------------------------------------------------------------
def test_prompt_format_history_and_audio_positions(tiny: LoadedStepAudio) -> None:
    tok, sp = tiny.tokenizer, tiny.special
    builder = PromptBuilder(tok, sp)
    first = Message("human", ("hello", AudioSlot(3)))
    conv = Conversation("Be brief.", [Turn(first, "Hi", reasoning="think")])
    user = Message("human", (AudioSlot(2), " the you"))
    prompt = conv.render(builder, user)
    text = tok.decode(prompt.ids)
    patches = "<audio_patch>"
    assert text == (
        "<|BOT|>system\nBe brief.<|EOT|>"
        f"<|BOT|>human\nhello<audio_start>{patches * 3}<audio_end><|EOT|>"
        "<|BOT|>assistant\n<think>\nthink\n</think>\nHi<|EOT|>"
        f"<|BOT|>human\n<audio_start>{patches * 2}<audio_end> the you<|EOT|>"
        "<|BOT|>assistant\n<think>\n"
    )
    assert prompt.n_audio == 5
    assert all(prompt.ids[i] == sp.audio_patch for i in prompt.audio_positions)
    assert [n for _, n in prompt.audio_spans] == [3, 2]
    assert prompt.ids.count(sp.audio_patch) == 5
    # every message is tokenized on its own: the history is a prefix of the next prompt
    head = builder.render(conv.messages(), add_generation_prompt=False)
    assert prompt.ids[: len(head.ids)] == head.ids
    assert Conversation("", [Turn(first, "a")] * 5, max_turns=2).messages()[0] == first
    assert len(Conversation("", [Turn(first, "a")] * 5, max_turns=2).messages()) == 4


# ---- generation --------------------------------------------------------------------------
def test_generation_stops_at_eot_and_splits_thinking(tiny: LoadedStepAudio) -> None:
    model, tok, sp = tiny.model, tiny.tokenizer, tiny.special
    audio = _speech(2.0)
    embeds = model.encode_audio(audio)
    prompt = Conversation("Be brief.").render(
        PromptBuilder(tok, sp), Message("human", audio_slots(len(audio)))
    )
    assert prompt.n_audio == embeds.shape[0] == embeddings_for_samples(len(audio))
    out = model.generate_greedy(prompt.ids, embeds, sp.stop_ids, max_new_tokens=20)
    assert out[-1] == sp.eot and len(out) == 5
    parser = ReasoningParser(in_thinking=True)
    events = []
    for i in out:  # token by token, as the engine streams it
        events += parser.feed(tok.decode([i]))
    events += parser.close()
    thinking = "".join(e.text for e in events if e.kind == "thinking")
    answer = "".join(e.text for e in events if e.kind == "answer")
    assert (thinking, answer) == ("hmm", "Hi!")
    assert parser.done
    # without the stop id the forced chain runs into max_new_tokens
    assert len(model.generate_greedy(prompt.ids, embeds, (), max_new_tokens=7)) == 7


def test_random_model_builds_the_configured_shapes() -> None:
    cfg = tiny_config()
    model = random_step_audio(cfg, device="cpu", dtype=torch.bfloat16, seed=1)
    assert model.dtype == torch.bfloat16
    params = dict(model.named_parameters())
    assert params["decoder.model.norm.weight"].eq(1).all()
    assert params["encoder.blocks.0.attn.query.bias"].eq(0).all()
    w = model.checkpoint_tensors()["model.layers.0.mlp.up_proj.weight"].float()
    assert 0.015 < float(w.std()) < 0.025 and math.isfinite(float(w.sum()))
    names = set(model.checkpoint_tensors())
    assert "encoder.blocks.1.attn.key.weight" in names
    assert "encoder.blocks.1.attn.key.bias" not in names
    assert {"adapter.conv.weight", "adapter.linear2.bias", "lm_head.weight"} <= names
    assert "model.layers.1.self_attn.q_proj.bias" in names
    assert "model.layers.1.self_attn.o_proj.bias" not in names
    with torch.device("meta"):
        full = StepAudioModel(step_audio_r1_config())
    n = sum(p.numel() for p in full.parameters())
    assert 33.0e9 < n < 33.6e9, n


def test_build_empty_allocates_on_the_device_and_redoes_computed_state() -> None:
    """Built on the meta device then ``to_empty``: every tensor real, of the asked dtype;
    the RoPE frequencies recomputed in float32 and tied embeddings tied again."""
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=True))
    model = build_empty(cfg, "cpu", torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    dec = model.decoder
    assert dec.lm_head.weight is dec.model.embed_tokens.weight
    assert dec.inv_freq.dtype == torch.float32 and dec.inv_freq.device.type == "cpu"
    assert torch.equal(dec.inv_freq, rope_inv_freq(cfg.text.head_dim, cfg.text.rope_theta))
    assert "lm_head.weight" not in model.checkpoint_tensors()


def test_tiny_checkpoint_files(tiny: LoadedStepAudio) -> None:
    root = Path(tiny.files.root)
    assert len(tiny.files.shards) == 3 and tiny.files.index is not None
    assert (root / "tokenizer_config.json").is_file()
    assert tiny.special.audio_patch == 151690 and tiny.special.eot == 151665


def test_step_audio_configs_load() -> None:
    from realtime.config import load_config

    real = load_config("step-audio-r1")
    assert real.engine.backend == "step-audio" and real.engine.model == ""
    assert load_config("step-audio-r1", {"engine.model": "/ckpt"}).engine.model == "/ckpt"
    rnd = load_config("step-audio-r1-random")
    assert rnd.engine.backend == "step-audio-random"
