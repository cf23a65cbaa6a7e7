"""Turning sampled token ids into streamed text: incremental detokenization and stop strings.

Pure logic over a `decode(ids) -> str` function, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"
# Decoding a few prompt tokens in front of the output keeps the leading space that SentencePiece
# decoders strip from the first token of a sequence (" Paris" must not become "Paris").
PREFIX_TOKENS = 4


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string at or after `start`, or None."""
    hits = [i for s in stops if s and (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    That suffix must be held back: the next token may complete the stop string.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class SampleText:
    """The text of one sample as tokens arrive: what is safe to emit, and whether it stopped."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
    ) -> None:
        self._decode = decode
        self._prefix = list(prompt_ids[-PREFIX_TOKENS:])
        self._prefix_text = decode(self._prefix)
        self._stops = tuple(s for s in stops if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, stop string excluded once stopped
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decoded(self) -> str:
        full = self._decode(self._prefix + self.ids)
        if full.startswith(self._prefix_text):
            return full[len(self._prefix_text) :]
        return self._decode(self.ids)  # the prefix merged with the output; rare

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became safe to emit (maybe empty)."""
        if self.stopped:
            raise RuntimeError("push after stop")
        self.ids.append(token_id)
        text = self._decoded()
        if text.endswith(REPLACEMENT_CHAR):
            return ""  # part of a multi-byte character: wait for the rest
        # Search a little before what was emitted: a stop string can straddle tokens.
        hit = find_stop(text, self._stops, max(0, self.emitted - self._max_stop))
        if hit is not None:
            self.stopped = True
            self.text = text[:hit]
            return self._take(len(self.text))
        self.text = text
        return self._take(len(text) - partial_stop_len(text, self._stops))

    def flush(self) -> str:
        """The sample ended (length or end-of-sequence): hand out whatever was held back."""
        if not self.stopped:
            self.text = self._decoded()
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
