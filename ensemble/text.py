"""Stop strings over streamed text, shared by engines (token streams) and fusion (text pieces)."""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest occurrence of any stop string at or after `start`, or None."""
    hits = [i for s in stops if s and (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string.

    That suffix must be held back: the next piece may complete the stop string.
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class StopScanner:
    """Text arriving in pieces: what is safe to emit, and whether a stop string was reached."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            raise RuntimeError("push after stop")
        self.text += piece
        hit = find_stop(self.text, self.stops, max(0, self.emitted - self._longest))
        if hit is not None:
            self.stopped = True
            self.text = self.text[:hit]
            return self.take(len(self.text))
        return self.take(len(self.text) - partial_stop_len(self.text, self.stops))

    def take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def flush(self) -> str:
        return self.take(len(self.text))
