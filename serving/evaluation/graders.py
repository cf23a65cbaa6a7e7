"""Grading a reply to a benchmark record the way evaluation harnesses grade.

- `choice`: the option letter, two ways. By log-probabilities (how harnesses score small
  models): the first generated token's top log-probabilities, restricted to the option letters
  (" A" and "A" count as one), highest wins. Generated: the letter the reply gives. A record is
  graded by log-probabilities when the reply carries them, else by the generated letter.
- `short`: TriviaQA's normalisation (lower case, no punctuation, articles or extra spaces); right
  when the short answer read from the reply equals an alias, or an alias appears as whole words
  in the reply's first line.
- `number`: the stated answer ("The answer is N", `####`, `\\boxed{}`), else the reply's last
  number (lm-eval's flexible extraction for GSM8K), compared as numbers.
- `code`: pass@1 by execution: the reply's code block, with the tests, in a subprocess
  (`serving.evaluation.execution`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ensemble.answers import (
    answer_span,
    boxed,
    extract,
    format_number,
    is_correct,
    normalize_text,
    numbers_in,
    parse_number,
)
from serving.evaluation.execution import run_tests

_GSM8K_MARK = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_STATED = re.compile(r"(?i)answer\s*(?:is|:|=)\s*:?\s*\$?\s*(-?[\d,]*\.?\d+)")
_CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[^\n]*\n(.*?)(?:```|$)", re.S)


@dataclass(frozen=True, slots=True)
class Grade:
    correct: bool
    answer: str | None  # what was read from the reply (a letter, text, number, or "passed")
    generated_correct: bool | None = None  # `choice` only: the generated letter's grade


def letter_by_logprob(
    top_logprobs: Sequence[Mapping[str, Any]], options: Sequence[str]
) -> str | None:
    """The option letter with the highest probability among the first token's candidates."""
    mass: dict[str, float] = {}
    for entry in top_logprobs:
        letter = str(entry["token"]).strip().upper()
        if letter in options:
            mass[letter] = mass.get(letter, 0.0) + math.exp(float(entry["logprob"]))
    return max(mass, key=lambda k: (mass[k], -options.index(k))) if mass else None


def final_number(reply: str) -> str | None:
    for pattern in (_GSM8K_MARK, _STATED):
        found = pattern.findall(reply)
        if found and (value := parse_number(found[-1])) is not None:
            return format_number(value)
    stated = boxed(reply)
    if stated is not None and (value := parse_number(stated)) is not None:
        return format_number(value)
    numbers = numbers_in(reply)
    return format_number(numbers[-1]) if numbers else None


def code_program(record: Mapping[str, Any], reply: str) -> str:
    """The program to run: the reply's first code block (or the whole reply), after the task's
    header when the reply only continues it, then the tests."""
    blocks = _CODE_BLOCK.findall(reply)
    code = blocks[0] if blocks else reply
    entry = record.get("entry_point") or ""
    prompt = record.get("prompt") or ""
    if entry and not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        code = prompt + code  # a body that continues the given header
    else:  # keep the header's imports, which replies often leave out
        imports = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
        code = "\n".join([*imports, code])
    return f"{code}\n\n{record['tests']}"


def grade(
    record: Mapping[str, Any],
    reply: str,
    first_token_logprobs: Sequence[Mapping[str, Any]] | None = None,
) -> Grade:
    kind = record.get("grader", "auto")
    answers: Sequence[str] = record["answers"]
    if kind == "auto":  # the project's own question set: lenient on form (ensemble.answers)
        return Grade(bool(reply) and is_correct(reply, answers), None)
    if kind == "choice":
        options = list(record.get("options") or "ABCD")
        generated = extract(reply, "choice")
        generated = generated if generated in options else None
        generated_correct = generated is not None and generated in answers
        by_logprob = letter_by_logprob(first_token_logprobs or [], options)
        letter = by_logprob if by_logprob is not None else generated
        return Grade(letter is not None and letter in answers, letter, generated_correct)
    if kind == "short":
        first_line = f" {normalize_text(answer_span(reply).split(chr(10), 1)[0])} "
        read = extract(reply, "short")
        targets = {normalize_text(a) for a in answers} - {""}
        correct = read in targets or any(f" {t} " in first_line for t in targets)
        return Grade(correct, read)
    if kind == "number":
        read = final_number(reply)
        value = None if read is None else parse_number(read)
        correct = value is not None and any(
            (gold := parse_number(a)) is not None and math.isclose(value, gold, abs_tol=1e-6)
            for a in answers
        )
        return Grade(correct, read)
    if kind == "code":
        outcome = run_tests(code_program(record, reply))
        return Grade(outcome.passed, outcome.detail)
    raise ValueError(f"unknown grader {kind!r} (choice, short, number, code)")
