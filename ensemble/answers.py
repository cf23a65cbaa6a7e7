"""Grading a free-text answer against reference answers: normalised match, numbers as numbers."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_PUNCT = str.maketrans(dict.fromkeys(string.punctuation, " "))


def normalize_text(text: str) -> str:
    """Lower case, no accents, punctuation or articles, single spaces: "The Côte!" -> "cote"."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _ARTICLES.sub(" ", text.translate(_PUNCT))
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """The text as a number if it is one ("1,234", "-3.5", "40."), else None."""
    cleaned = text.strip().rstrip(".").replace(",", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def numbers_in(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def answer_span(response: str) -> str:
    """The part of a response that holds its answer: up to the first blank line.

    Small models often answer, then ramble on into a new question; the first paragraph is what
    they meant as the answer.
    """
    return response.strip().split("\n\n", 1)[0]


def is_correct(response: str, answers: Sequence[str]) -> bool:
    """Whether `response` gives one of `answers`.

    A numeric reference is compared as a number with the last number of the answer span (working
    comes before the result: "8 x 5 = 40"). A text reference must appear in the normalised span
    as whole words.
    """
    span = answer_span(response)
    normalized = f" {normalize_text(span)} "
    found_numbers = numbers_in(span)
    for answer in answers:
        number = parse_number(answer)
        if number is not None:
            if found_numbers and abs(found_numbers[-1] - number) < 1e-9:
                return True
        elif (target := normalize_text(answer)) and f" {target} " in normalized:
            return True
    return False
