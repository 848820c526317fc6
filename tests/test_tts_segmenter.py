from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tts.segmenter import Segmenter, SegmenterConfig


def segment(deltas: list[str], cfg: SegmenterConfig | None = None) -> list[str]:
    seg = Segmenter(cfg)
    out: list[str] = []
    for d in deltas:
        out += seg.push(d)
    return out + seg.flush()


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# Text made of the characters the rules care about, so that hypothesis hits the edge cases.
ALPHABET = st.sampled_from(
    list("ab cd e.,;:!?—-'\")]*`[\n 0123 $%/@")
    + [
        "Dr.",
        "e.g.",
        "1,000",
        "3:30",
        "example.com",
        "https://x.io/a?b=1",
        "1.",
        "...",
        "**",
    ]
)
TEXT = st.lists(ALPHABET, max_size=120).map("".join)
CFG = st.builds(
    SegmenterConfig,
    first_piece_words=st.integers(1, 6),
    second_piece_words=st.integers(1, 15),
    long_piece_chars=st.integers(1, 80),
    growth=st.floats(0.5, 4.0),
    max_piece_chars=st.integers(2, 60),
)


@settings(max_examples=400, deadline=None)
@given(TEXT, st.lists(st.integers(0, 130), max_size=20), CFG)
def test_any_split_gives_the_same_pieces_and_loses_nothing(
    text: str, cuts: list[int], cfg: SegmenterConfig
) -> None:
    whole = segment([text], cfg)
    streamed = segment(split_at(text, cuts), cfg)
    assert "".join(streamed) == text
    assert streamed == whole
    assert all(piece for piece in streamed)
    assert all(len(piece) <= cfg.max_piece_chars for piece in streamed)


@settings(max_examples=100, deadline=None)
@given(TEXT)
def test_char_by_char_equals_whole(text: str) -> None:
    assert segment(list(text)) == segment([text])


def test_first_clause_is_released_at_once() -> None:
    seg = Segmenter()
    assert seg.push("Sure") == []
    assert seg.push(",") == ["Sure,"]  # no lookahead needed after a word and a comma
    assert seg.push(" the capital") == []


def test_first_piece_after_n_words_without_punctuation() -> None:
    seg = Segmenter(SegmenterConfig(first_piece_words=4))
    out = []
    for token in ["The", " capital", " city", " of", " France", " is"]:
        out += seg.push(token)
    assert out == ["The capital city of France"]  # "of" is not a good place to stop


def test_a_word_cut_does_not_separate_a_number_from_its_unit() -> None:
    pieces = segment(
        ["It costs about $3 million to build it."], SegmenterConfig(first_piece_words=4)
    )
    assert pieces[0] == "It costs about $3 million"


def test_sentence_end_waits_for_one_char() -> None:
    seg = Segmenter()
    assert seg.push("Hi there.") == []  # could be "there.com"
    assert seg.push(" How") == ["Hi there."]


def test_numbers_abbreviations_and_urls_are_not_cut() -> None:
    text = "Dr. Smith paid $3.50 for 1,000 apples at 3:30, e.g. at example.com today."
    pieces = segment([text], SegmenterConfig(first_piece_words=50, second_piece_words=50))
    assert pieces == [
        "Dr. Smith paid $3.50 for 1,000 apples at 3:30,",
        " e.g. at example.com today.",
    ]


def test_later_pieces_cut_at_sentences_and_long_clauses() -> None:
    text = (
        "Sure, here it is. It was built in 1889, for the fair. "
        "Paris has about two million people, and it is known for art, fashion, and food."
    )
    pieces = segment([text])
    assert pieces == [
        "Sure,",
        " here it is.",
        " It was built in 1889,",  # a clause as long as all before it (17 chars)
        " for the fair.",
        " Paris has about two million people, and it is known for art,",  # >= 60 chars
        " fashion, and food.",
    ]


def test_early_pieces_grow_geometrically_without_punctuation() -> None:
    text = "Yes, " + " ".join("abcdefghij"[i % 10] * (3 + i % 4) for i in range(60))
    cfg = SegmenterConfig(second_piece_words=3, max_piece_chars=220)
    pieces = segment([text], cfg)
    assert "".join(pieces) == text
    lengths = [len(p) for p in pieces]
    assert lengths[2] <= 2 * sum(lengths[:2]) + 8  # one word past twice what came before
    assert lengths[3] <= 2 * sum(lengths[:3]) + 8
    assert all(n <= 220 for n in lengths)


def test_list_lines_are_pieces_and_markers_do_not_end_sentences() -> None:
    pieces = segment(["Steps:\n1. Mix it\n2. Bake it"])
    assert pieces == ["Steps:", "\n1. Mix it", "\n2. Bake it"]


def test_long_text_without_punctuation_is_cut_at_spaces() -> None:
    text = " ".join(["word"] * 100)
    pieces = segment([text], SegmenterConfig(max_piece_chars=50))
    assert "".join(pieces) == text
    assert all(len(p) <= 50 for p in pieces)
    assert all(not p.endswith("wor") for p in pieces)


def test_no_cut_inside_code_or_link_text() -> None:
    cfg = SegmenterConfig(first_piece_words=10)
    pieces = segment(["Run `a, b, c` now. See [this, that](http://x.y/z?q=1). Done."], cfg)
    assert pieces[0] == "Run `a, b, c` now."
    assert pieces[1] == " See [this, that](http://x.y/z?q=1)."


@settings(max_examples=200, deadline=None)
@given(TEXT, CFG)
def test_candidate_is_what_a_space_would_release(text: str, cfg: SegmenterConfig) -> None:
    seg = Segmenter(cfg)
    released = seg.push(text)
    guess = seg.candidate()
    assert seg.pending == text[len("".join(released)) :]  # candidate() consumed nothing
    after_space = seg.push(" ")
    assert after_space[:1] == ([guess] if guess is not None else [])
