"""Reading the answer out of a free-text reply: extraction, normalisation, grading, medoids.

Formats (a pool's `answer_format`):
- `number`: the content of the last `\\boxed{}`, else an "Answer:" line or "the answer is X", else
  the last number of the reply's first paragraph; canonical form "40", "-3.5", "1234".
- `choice`: an option letter A-J from `\\boxed{}`, "Answer: (C)", "the answer is C", or a reply that
  is just the letter.
- `short`: `\\boxed{}`, else an "Answer:" line, else the first line of the reply (what follows its
  last " is ", when that is short: "The capital of Peru is Lima." -> "lima"); normalised text.
- `text`: nothing is extracted (votes fall back to the medoid reply).
- `auto`: `\\boxed{}` or an "Answer:" line when present (as a number if it is one); else a number
  when the first paragraph ends in one; else the first line when it is short (at most 8 words),
  read as `short`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from typing import Literal

AnswerFormat = Literal["auto", "number", "choice", "short", "text"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_PUNCT = str.maketrans(dict.fromkeys(string.punctuation, " "))
_ANSWER_LINE = re.compile(r"(?im)^\W*(?:final\s+)?answer\s*(?:is)?\s*[:=]\s*(.+?)\s*$")
_ANSWER_IS = re.compile(r"(?i)\banswer\s+is\s*:?\s*([^,;\n]+?)\s*(?:[,;\n]|\.(?:\s|$)|$)")
# Most explicit first; letters must be capitals outside "answer", so "I think" is no option I.
_CHOICES = [
    re.compile(r"(?i:answer)\s*(?:is)?\s*[:=]?\s*\(?([A-Ja-j])\b"),
    re.compile(r"\(([A-J])\)"),
    re.compile(r"^\W*([A-J])\W*$"),
    re.compile(r"\b(?:is|option|choice)\s+\(?([A-J])\b"),
]
_SHORT_WORDS = 8


def normalize_text(text: str) -> str:
    """Lower case, no accents, punctuation or articles, single spaces: "The Côte!" -> "cote"."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _ARTICLES.sub(" ", text.translate(_PUNCT))
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """The text as a number if it is one ("1,234", "-3.5", "40."), else None."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace(" ", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def format_number(value: float) -> str:
    """Canonical text for a number: 40.0 -> "40", 2.50 -> "2.5"."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def numbers_in(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def answer_span(response: str) -> str:
    """The part of a response that holds its answer: up to the first blank line.

    Small models often answer, then ramble on into a new question; the first paragraph is what
    they meant as the answer.
    """
    return response.strip().split("\n\n", 1)[0]


def boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _stated(response: str) -> str | None:
    """An answer the reply states explicitly: boxed, on an "Answer:" line, or "the answer is X"."""
    found = boxed(response)
    if found is not None:
        return found
    lines = _ANSWER_LINE.findall(response)
    if lines:
        return str(lines[-1])
    said = _ANSWER_IS.findall(answer_span(response))
    return str(said[-1]) if said else None


def _as_number(text: str) -> str | None:
    value = parse_number(text)
    if value is None:
        found = numbers_in(text)
        value = found[-1] if found else None
    return None if value is None else format_number(value)


def extract(response: str, fmt: AnswerFormat = "auto") -> str | None:
    """The canonical answer in `response`, or None when there is none to vote on."""
    if fmt == "text":
        return None
    stated = _stated(response)
    span = answer_span(response)
    if fmt == "number":
        return _as_number(stated if stated is not None else span)
    if fmt == "choice":
        sources = ([f"Answer: {stated}"] if stated is not None else []) + [span]
        for source in sources:
            for pattern in _CHOICES:
                if match := pattern.search(source):
                    return match.group(1).upper()
        return None
    if fmt == "short":
        source = stated if stated is not None else _predicate(span.split("\n", 1)[0])
        return normalize_text(source) or None
    # auto
    if stated is not None:
        return (
            format_number(v)
            if (v := parse_number(stated)) is not None
            else (normalize_text(stated) or None)
        )
    first_line = span.split("\n", 1)[0]
    if re.search(r"\d[\d,]*(?:\.\d+)?\W*$", span):
        return _as_number(span)
    if 0 < len(first_line.split()) <= _SHORT_WORDS:
        return normalize_text(_predicate(first_line)) or None
    return None


def _predicate(sentence: str) -> str:
    """What a sentence says something *is*: "The capital of Peru is Lima." -> "Lima."

    Small models restate the question before answering; votes must compare the answers.
    """
    head, sep, tail = sentence.rpartition(" is ")
    tail = re.split(r"[,;(]", tail, maxsplit=1)[0]  # "Lima, Peru." -> "Lima"
    return tail if sep and head and 0 < len(tail.split()) <= 4 else sentence


def is_correct(response: str, answers: Sequence[str]) -> bool:
    """Whether `response` gives one of `answers` (grading, not voting: lenient on form).

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


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the normalised word sets (1.0 for two empty texts)."""
    wa, wb = set(normalize_text(a).split()), set(normalize_text(b).split())
    if not wa and not wb:
        return 1.0
    return len(wa & wb) / len(wa | wb)


def medoid(texts: Sequence[str]) -> int:
    """Index of the text most similar to the others on average (the first on ties)."""
    if len(texts) <= 2:
        return 0
    totals = [
        sum(similarity(t, u) for j, u in enumerate(texts) if j != i) for i, t in enumerate(texts)
    ]
    return max(range(len(texts)), key=lambda i: (totals[i], -i))
