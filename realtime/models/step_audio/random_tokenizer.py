"""The tokenizer of the ``step-audio-random`` backend (benchmarks: no checkpoint is read).

Full-size random weights come with no ``tokenizer.json``, but the engine still needs one to
build prompts and turn the (meaningless) tokens into text. This one is a byte-level BPE like
Qwen's (the 256 byte symbols, so every text can be encoded and every id decodes), with merges
for a few words and the Step-Audio special tokens at the ids of the real vocabulary. The ids
fixed by public code are real (``<|EOT|>`` 151665, ``<audio_start>`` 151688, ``<audio_patch>``
151690, and Qwen's ``<|endoftext|>``/``<|im_start|>``/``<|im_end|>``); the others are
placeholders in the same range. A real checkpoint's ids are always read from its tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from realtime.models.step_audio.tokens import TextTokenizer

SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|EOT|>": 151665,
    "<|BOT|>": 151666,
    "<think>": 151667,
    "</think>": 151668,
    "<|CALL_START|>": 151669,
    "<|CALL_END|>": 151670,
    "<audio_start>": 151688,
    "<audio_end>": 151689,
    "<audio_patch>": 151690,
    "<tts_start>": 151693,
    "<tts_end>": 151694,
}
PROMPT_WORDS = ("system", "human", "assistant", "think")  # one token each


def random_tokenizer_json(words: Sequence[str] = PROMPT_WORDS) -> str:
    """``tokenizer.json`` text: byte-level BPE, a merge chain for each of ``words`` (so each
    is one token), then the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in words:
        sym = "".join(s for s, _ in byte_level.pre_tokenize_str(word))
        for k in range(1, len(sym)):
            left, right = sym[:k], sym[k]
            if sym[: k + 1] not in vocab:
                merges.append((left, right))
                vocab[sym[: k + 1]] = len(vocab)
    vocab.update(SPECIAL_TOKEN_IDS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKEN_IDS]
    )
    return str(tok.to_str())


def random_tokenizer(words: Sequence[str] = PROMPT_WORDS) -> TextTokenizer:
    from tokenizers import Tokenizer

    json_text = random_tokenizer_json(words)
    return TextTokenizer(Tokenizer.from_str(json_text), "step-audio-random byte-level tokenizer")
