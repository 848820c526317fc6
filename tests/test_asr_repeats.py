"""Whisper's decoding loops (a phrase read twice, a word changed) are cut; people's own short
repeats and ordinary sentences are left alone."""

import pytest

from realtime.asr import drop_repeated_tail


@pytest.mark.parametrize(
    ("decoded", "kept"),
    [
        (
            "And why there's so many colors and why there are so many colors.",
            "And why there's so many colors",
        ),
        (
            "Could you explain how a rainbow forms? And why it has so many colors? "
            "and why it has, so many colors.",
            "Could you explain how a rainbow forms? And why it has so many colors?",
        ),
        ("what is it what is it what is it", "what is it"),
        ("What is the capital of France? What is the Capital", "What is the capital of France?"),
    ],
)
def test_a_repeated_tail_is_dropped(decoded: str, kept: str) -> None:
    assert drop_repeated_tail(decoded) == kept


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "no, no, no",  # shorter than three words a repeat
        "I want the red one, not the blue one.",
        "the cat sat on the mat and the dog sat on the rug",
        "I said yes and then I said yes again",
        "I like it. I like it a lot.",  # a sentence that starts like the last one goes on
        "Is it on? Is it",  # a two-word restart is too short to call a loop
        "",
    ],
)
def test_ordinary_sentences_are_kept(text: str) -> None:
    assert drop_repeated_tail(text) == text
