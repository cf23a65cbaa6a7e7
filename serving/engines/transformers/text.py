"""Turning sampled token ids into streamed text: incremental detokenization and stop strings.

Pure logic over a `decode(ids) -> str` function, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ensemble.text import StopScanner

REPLACEMENT_CHAR = "\ufffd"
# Decoding a few prompt tokens in front of the output keeps the leading space that SentencePiece
# decoders strip from the first token of a sequence (" Paris" must not become "Paris").
PREFIX_TOKENS = 4


class SampleText:
    """The text of one sample as tokens arrive: what is safe to emit, and whether it stopped.

    Tokens are decoded here; stop strings are `ensemble.text.StopScanner`'s job.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
    ) -> None:
        self._decode = decode
        self._prefix = list(prompt_ids[-PREFIX_TOKENS:])
        self._prefix_text = decode(self._prefix)
        self._scanner = StopScanner(stops)
        self._decoded_len = 0  # characters of the decoded output already given to the scanner
        self.ids: list[int] = []

    @property
    def stopped(self) -> bool:
        return self._scanner.stopped

    def _decoded(self) -> str:
        full = self._decode(self._prefix + self.ids)
        if full.startswith(self._prefix_text):
            return full[len(self._prefix_text) :]
        return self._decode(self.ids)  # the prefix merged with the output; rare

    def _new_text(self, text: str) -> str:
        piece = text[self._decoded_len :]
        self._decoded_len = len(text)
        return piece

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became safe to emit (maybe empty)."""
        if self.stopped:
            raise RuntimeError("push after stop")
        self.ids.append(token_id)
        text = self._decoded()
        if text.endswith(REPLACEMENT_CHAR):
            return ""  # part of a multi-byte character: wait for the rest
        return self._scanner.push(self._new_text(text))

    def flush(self) -> str:
        """The sample ended (length or end-of-sequence): hand out whatever was held back."""
        if self.stopped:
            return self._scanner.flush()
        delta = self._scanner.push(self._new_text(self._decoded()))
        return delta if self.stopped else delta + self._scanner.flush()
