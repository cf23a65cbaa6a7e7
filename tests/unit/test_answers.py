"""Answer extraction and grading: table tests for the forms small models write, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemble.answers import (
    boxed,
    extract,
    format_number,
    is_correct,
    medoid,
    normalize_text,
    parse_number,
)


@pytest.mark.parametrize(
    ("reply", "fmt", "expected"),
    [
        ("36 + 17 = 53", "number", "53"),
        ("To find 6 times 7, we multiply: 42.", "number", "42"),
        ("The answer is 18, which is 7 times 8.", "number", "18"),
        ("Answer: 1,234", "number", "1234"),
        ("so x = \\boxed{\\frac{1}{2}} and then 7", "short", "frac 1 2"),
        ("The result is \\boxed{40}. Check: 8 x 5 = 40", "number", "40"),
        ("It is -3.50 degrees", "number", "-3.5"),
        ("No digits here", "number", None),
        ("Answer: (C) because it is", "choice", "C"),
        ("I think it is B.", "choice", "B"),
        ("D", "choice", "D"),
        ("answer: e", "choice", "E"),
        ("I am not sure", "choice", None),
        ("The capital of Peru is Lima, Peru.", "short", "lima"),
        (" Buenos Aires.", "short", "buenos aires"),
        ('The plural of the word "bus" is "buses".', "auto", "buses"),
        ("The capital of Egypt is Cairo.\n\nQuestion: what else?", "auto", "cairo"),
        ("74 + 69 = 143", "auto", "143"),
        ("Once upon a time there was a long story about many things and people", "auto", None),
        ("Paris", "text", None),
    ],
)
def test_extract(reply: str, fmt: str, expected: str | None) -> None:
    assert extract(reply, fmt) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "answers", "correct"),
    [
        ("The capital of Argentina is Buenos Aires.", ["Buenos Aires"], True),
        ("Buenos", ["Buenos Aires"], False),
        ("8 x 5 = 40", ["40"], True),
        ("40 is wrong, it is 41", ["40"], False),
        ("The symbol is S.", ["S"], True),
        ("The symbol is Si.", ["S"], False),
        ("43\n\nThen 53", ["53"], False),  # only the first paragraph counts
        ("Bogotá", ["Bogota"], True),
    ],
)
def test_is_correct(reply: str, answers: list[str], correct: bool) -> None:
    assert is_correct(reply, answers) is correct


def test_boxed_balances_braces() -> None:
    assert boxed("x \\boxed{a{b}c} y \\boxed{2}") == "2"
    assert boxed("\\boxed{a{b}c}") == "a{b}c"
    assert boxed("\\boxed{open") is None


@given(st.text(max_size=60))
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once


@given(
    st.integers(-(10**9), 10**9) | st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: round(x, 3))
)
def test_numbers_round_trip_through_any_phrasing(value: float) -> None:
    text = format_number(value)
    assert parse_number(text) == pytest.approx(value)
    for reply in (f"The result is {text}", f"Answer: {text}", f"\\boxed{{{text}}}"):
        assert extract(reply, "number") == text


@given(st.sampled_from("ABCDEFGHIJ"), st.sampled_from(["Answer: {}", "({})", "{}", "It is {}."]))
def test_choice_letters_are_found(letter: str, form: str) -> None:
    assert extract(form.format(letter), "choice") == letter


def test_medoid_picks_the_most_typical_text() -> None:
    texts = ["the cat sat", "a dog ran far away", "the cat sat down", "the cat sat there"]
    assert medoid(texts) == 0
