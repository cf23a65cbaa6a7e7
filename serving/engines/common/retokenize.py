"""A decode session's prompt and answer as token ids, with text chosen by other experts
re-tokenized only at the tail (every engine's session keeps one).

Text another expert chose is appended as text; tokenizing it alone would split it where this
tokenizer would not (" Par" + "is" is one token " Paris" to it), and tokenizing the whole answer
again costs more as it grows. So the text is tokenized together with a few tokens before it:
from `TAIL_TOKENS` tokens back, or further back to the nearest token whose place in the text is
known, and those tokens are replaced by what comes out. Tokens the expert chose itself
(`add_ids`) are kept as they are, so a session on its own greedy path stays on it.

Where each token starts in the text is known for tokens a tokenizer gave with offsets (in
process) and for the first token of each piece otherwise (the expert's own multi-token pieces,
a remote tokenizer's answer); re-tokenizing starts only at such a token. The engine does the
tokenizing: `tail` says what to tokenize, `settle` takes the result (so the remote session can
ask its server, and the local ones their tokenizer, `extend`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Tokens re-tokenized with new text: enough to cover any merge across the join.
TAIL_TOKENS = 8

Starts = list[int | None]  # where each token starts in the text; None: not known
Tokenize = Callable[[str], tuple[list[int], Starts]]


@dataclass(frozen=True, slots=True)
class Tail:
    """What to tokenize again: the answer's text from `offset` on, to replace the tokens from
    `keep` (an index into the ids, prompt included) on."""

    keep: int
    offset: int
    text: str


class AnswerTokens:
    def __init__(self, prompt_ids: Sequence[int]) -> None:
        self.prompt_len = len(prompt_ids)
        self.ids = list(prompt_ids)  # the prompt, then the answer as far as it is tokenized
        self.starts: Starts = []  # per answer token
        self.text = ""  # the answer's text, all of it
        self._tokenized = 0  # `text[:_tokenized]` is what the answer's ids spell

    def snapshot(self) -> tuple[list[int], Starts, str, int]:
        """The state to `restore` after looking ahead (a draft, a look-ahead's guess)."""
        return list(self.ids), list(self.starts), self.text, self._tokenized

    def restore(self, state: tuple[list[int], Starts, str, int]) -> None:
        ids, starts, self.text, self._tokenized = state
        self.ids, self.starts = list(ids), list(starts)

    @property
    def pending(self) -> bool:
        """Text was appended that is not tokenized yet."""
        return self._tokenized < len(self.text)

    def add_text(self, text: str) -> None:
        """Append text another expert chose; it is tokenized at the next `tail`/`settle`."""
        self.text += text

    def add_ids(self, ids: Sequence[int], text: str) -> None:
        """Append tokens the expert chose itself, as they are (behind text still to tokenize,
        or with no ids at all, they are text like any other)."""
        if self.pending or not ids:
            self.add_text(text)
            return
        self.starts += [len(self.text), *[None] * (len(ids) - 1)]
        self.ids += ids
        self.text += text
        self._tokenized = len(self.text)

    def tail(self, more: str = "") -> Tail:
        """What to tokenize so that the ids spell the text (and `more` after it, for a look at
        the ids that text would have without appending it)."""
        answer = len(self.ids) - self.prompt_len
        keep = max(0, answer - TAIL_TOKENS)
        while keep > 0 and self.starts[keep] is None:
            keep -= 1
        start = self.starts[keep] if keep < answer else None
        offset = start if start is not None else 0
        return Tail(self.prompt_len + keep, offset, (self.text + more)[offset:])

    def retokenized(self, tail: Tail, ids: Sequence[int]) -> list[int]:
        """The ids with the tail's tokens replaced by `ids`, its text tokenized."""
        return [*self.ids[: tail.keep], *ids]

    def settle(self, tail: Tail, ids: Sequence[int], starts: Starts) -> None:
        """Take `tail`'s text (`tail()` with nothing more) as tokenized: `ids`, and where each
        starts in that text (None: not known; the first one must be known)."""
        keep = tail.keep - self.prompt_len
        self.ids = self.retokenized(tail, ids)
        moved = (None if start is None else tail.offset + start for start in starts)
        self.starts = [*self.starts[:keep], *moved]
        self._tokenized = len(self.text)

    def extend(self, text: str, tokenize: Tokenize) -> None:
        """Append text another expert chose and tokenize the tail at once (in process)."""
        if text:
            self.add_text(text)
            tail = self.tail()
            self.settle(tail, *tokenize(tail.text))


def tokenize_with_starts(tokenizer: Any, text: str) -> tuple[list[int], Starts]:
    """`text` through a Hugging Face tokenizer: the ids, and where each starts (its offsets)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    return ids, [start for start, _ in encoded["offset_mapping"]]
