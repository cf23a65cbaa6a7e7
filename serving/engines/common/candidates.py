"""One step of a decode session as candidates: the rules every engine's session follows
(transformers, vLLM, remote), over a view of the step's top log-probabilities.

- Every end-of-sequence token becomes one `end` candidate, text "".
- Other special tokens are dropped.
- A token that is only part of a UTF-8 character is completed along the expert's greedy path when
  it is the top one (the engine follows that path: `partial_top`, then `complete_character` or
  `character_prefixes`), else dropped.
- Tokens with the same text become one candidate carrying their summed mass.
- The first `k` texts are kept, renormalised over themselves, most likely first; none usable
  (every top entry special or a partial character): the answer ends.
- The entropy is `entropy.estimated_entropy` of the view.

No model framework here, so the remote session stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from ensemble.types import Candidate, NextTokens
from serving.engines.common.entropy import ENTROPY_TOP, estimated_entropy

# A candidate token that is only part of a UTF-8 character is completed greedily, this far.
MAX_BYTE_LOOKAHEAD = 4
# Entries looked at beyond `k`: special and partial-character tokens are dropped.
EXTRA_ENTRIES = 8
REPLACEMENT = "\ufffd"
END = Candidate("", 0.0, (), end=True)  # the answer ends here

TokenKind = Literal["text", "end", "special"]
Ranked = Sequence[tuple[int, float]]  # (token id, logprob) of one step, most likely first


class TokenPieces(Protocol):
    """What a session knows of its expert's tokens: each one's kind and its text alone."""

    def kind(self, token: int) -> TokenKind: ...

    def text(self, token: int) -> str: ...


class Completion(NamedTuple):
    """A partial-character token completed: the text, the tokens that spell it, their logprob."""

    text: str
    token_ids: tuple[int, ...]
    logprob: float


class TokenizerPieces:
    """`TokenPieces` of a Hugging Face tokenizer in process (transformers and vLLM sessions)."""

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.special_ids = frozenset(tokenizer.all_special_ids) | eos_ids
        self._texts: dict[int, str] = {}

    def kind(self, token: int) -> TokenKind:
        if token in self.eos_ids:
            return "end"
        return "special" if token in self.special_ids else "text"

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.decode([token])
        return text

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids))
        return text


def view_size(k: int) -> int:
    """How many of a step's top entries a session asks for when it builds `k` candidates: `k`
    and a margin, and never fewer than the entropy estimate reads."""
    return max(k + EXTRA_ENTRIES, ENTROPY_TOP)


def ranked(view: Mapping[int, float]) -> list[tuple[int, float]]:
    """A view {token id: logprob} as entries, most likely first (ties: the lower id first)."""
    return sorted(view.items(), key=lambda entry: (-entry[1], entry[0]))


def is_whole(text: str) -> bool:
    """Text that decodes to whole characters (a partial UTF-8 one decodes to U+FFFD)."""
    return bool(text) and REPLACEMENT not in text


def partial_top(entries: Ranked, pieces: TokenPieces) -> tuple[int, float] | None:
    """The top entry when it is text but only part of a UTF-8 character: the one to complete."""
    if not entries:
        return None
    token, logprob = entries[0]
    if pieces.kind(token) != "text" or is_whole(pieces.text(token)):
        return None
    return token, logprob


def character_prefixes(
    path: Iterable[tuple[int, float]],
) -> Iterator[tuple[tuple[int, ...], float]]:
    """The greedy `path` from a partial-character token (that token first, read lazily) cut
    where the character may be whole: after its second token and up to `MAX_BYTE_LOOKAHEAD`
    tokens past the first, with their summed logprob."""
    ids: list[int] = []
    total = 0.0
    for token, logprob in path:
        ids.append(token)
        total += logprob
        if len(ids) > 1:
            yield tuple(ids), total
        if len(ids) > MAX_BYTE_LOOKAHEAD:
            return


def complete_character(
    path: Iterable[tuple[int, float]], decode: Callable[[Sequence[int]], str]
) -> Completion | None:
    """The shortest cut of `path` (see `character_prefixes`) that decodes to whole text."""
    for ids, logprob in character_prefixes(path):
        text = decode(ids)
        if is_whole(text):
            return Completion(text, ids, logprob)
    return None


def next_tokens(
    entries: Ranked,
    k: int,
    pieces: TokenPieces,
    completed: Completion | None = None,
    distribution: Any = None,
) -> NextTokens:
    """The step's `NextTokens` by the rules in the module docstring. `entries` are the step's
    top entries, most likely first; `completed`, the top entry completed to a whole character
    (where `partial_top` named one)."""
    mass: dict[str, float] = {}
    paths: dict[str, tuple[int, ...]] = {}
    path: tuple[int, ...]
    for rank, (token, logprob) in enumerate(entries):
        if len(mass) >= k:
            break
        kind = pieces.kind(token)
        if kind == "special":
            continue
        text, path, lp = "", (token,), logprob
        if kind == "text":
            text = pieces.text(token)
            if not is_whole(text):
                if rank or completed is None:
                    continue
                text, path, lp = completed
        mass[text] = mass.get(text, 0.0) + math.exp(lp)
        paths.setdefault(text, path)
    candidates = renormalised(dict(sorted(mass.items(), key=lambda item: -item[1])), paths)
    entropy = estimated_entropy(lp for _, lp in entries[:ENTROPY_TOP])
    return NextTokens(candidates or (END,), entropy, distribution)


def renormalised(
    mass: Mapping[str, float], paths: Mapping[str, tuple[int, ...]]
) -> tuple[Candidate, ...]:
    """Pieces of text with their summed probabilities, as candidates renormalised over those
    kept (in `mass`'s order); the piece "" is end-of-sequence."""
    total = sum(mass.values()) or 1.0
    return tuple(
        Candidate(text, math.log(m / total), paths[text], end=text == "")
        for text, m in mass.items()
    )
