from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts.normalize import normalize
from tts.numbers import cardinal, decimal, ordinal, year


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (1001, "one thousand one"),
        (1234567, "one million two hundred thirty-four thousand five hundred sixty-seven"),
        (-8, "minus eight"),
    ],
)
def test_cardinal(n: int, words: str) -> None:
    assert cardinal(n) == words


def test_ordinals_years_decimals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 5, 12, 20, 21, 100)] == [
        "first",
        "second",
        "third",
        "fifth",
        "twelfth",
        "twentieth",
        "twenty-first",
        "one hundredth",
    ]
    assert year(1984) == "nineteen eighty-four"
    assert year(1905) == "nineteen oh five"
    assert year(2005) == "two thousand five"
    assert year(2024) == "twenty twenty-four"
    assert decimal("3.14") == "three point one four"
    assert decimal("-0.5") == "minus zero point five"


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("It costs $3.50.", "It costs three dollars and fifty cents."),
        ("Only $1 or $0.99", "Only one dollar or ninety-nine cents"),
        ("€10 and £5", "ten euros and five pounds"),
        ("$1,250,000", "one million two hundred fifty thousand dollars"),
        ("$3 million", "three million dollars"),
        ("$1.5 billion", "one point five billion dollars"),
        ("up 45% and 3.5 %", "up forty-five percent and three point five percent"),
        ("at 3:30 pm", "at three thirty P M"),
        ("at 3 p.m. sharp", "at three P M sharp"),
        ("by 9:05 AM.", "by nine oh five A M."),
        ("at 15:00", "at fifteen hundred"),
        ("on 2024-03-15", "on March fifteenth, twenty twenty-four"),
        ("on 3/15/2024", "on March fifteenth, twenty twenty-four"),
        ("March 15, 2024", "March fifteenth, twenty twenty-four"),
        ("1 May 2023", "the first of May, twenty twenty-three"),
        ("you may be 5 may be", "you may be five may be"),
        ("the 1st and 23rd", "the first and twenty-third"),
        (
            "in 1984 with 1,500 people",
            "in nineteen eighty-four with one thousand five hundred people",
        ),
        ("pi is 3.14 and -5", "pi is three point one four and minus five"),
        ("Dr. Smith vs. Mr. Jones", "Doctor Smith versus Mister Jones"),
        ("fruit, e.g. apples, i.e. food", "fruit, for example apples, that is food"),
        ("apples, etc.", "apples, et cetera."),
        ("St. Louis on Main St. now", "Saint Louis on Main Street now"),
        (
            "See https://www.example.com/docs/intro now",
            "See example dot com slash docs slash intro now",
        ),
        ("Go to https://x.org/a/b/c/d?q=1.", "Go to x dot org."),
        ("visit example.com.", "visit example dot com."),
        ("mail jo.doe@example.org", "mail jo dot doe at example dot org"),
        ("**Bold** and `code` and *it*", "Bold and code and it"),
        ("# Title", "Title"),
        ("\n- an item", "an item"),
        ("\n2. Mix well", "two, Mix well"),
        ("See [the docs](https://docs.python.org/3/).", "See the docs."),
        ("that](http://x.y/z?q=1).", "that."),
        ("Great job 😀👍🏽 🇺🇸!", "Great job!"),
        (
            "25°C, 5 km at 60 mph",
            "twenty-five degrees Celsius, five kilometers at sixty miles per hour",
        ),
        ("Call 555-123-4567", "Call five five five, one two three, four five six seven"),
        ("ranked #1 of 10-20", "ranked number one of ten to twenty"),
        ("C++ and/or Rust & Go", "C plus plus and or Rust and Go"),
        ("zip 02139", "zip zero two one three nine"),
    ],
)
def test_normalize(text: str, spoken: str) -> None:
    assert normalize(text) == spoken


def test_plain_sentences_are_unchanged() -> None:
    text = "Paris is the capital of France, and it is lovely in spring."
    assert normalize(text) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_never_fails_and_leaves_no_markup(text: str) -> None:
    out = normalize(text)
    assert not any(c in out for c in "*`#_[]|")
    assert out == out.strip(" ,;:")
