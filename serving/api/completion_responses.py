"""The legacy completions API's response shape: `text_completion` objects, whole or streamed,
with the legacy `logprobs` object (parallel lists: `tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ensemble.types import Piece, TokenLogprob, ToolCall


@dataclass(slots=True)
class TextCompletionShape:
    """Choices of `text_completion`s: one per sample of each prompt (prompt `p`'s sample `i` is
    choice `p * n + i`). With `echo`, a choice's text starts with its prompt: in a stream, the
    prompt is the choice's first chunk. `text_offset`s count characters of the choice's text,
    echoed prompt included, so a stream keeps each choice's running offset."""

    prompts: tuple[str, ...]
    n: int
    echo: bool
    logprobs: bool
    object: str = "text_completion"
    chunk_object: str = "text_completion"  # OpenAI streams `text_completion` objects too
    _offsets: dict[int, int] = field(default_factory=dict)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def _echoed(self, index: int) -> str:
        return self.prompts[index // self.n] if self.echo else ""

    def choice(
        self,
        index: int,
        text: str | None,
        finish: str,
        logprobs: tuple[TokenLogprob, ...],
        pieces: tuple[Piece, ...] = (),  # noqa: ARG002 (`chorus_pieces` is chat's extension)
        tool_calls: tuple[ToolCall, ...] = (),  # noqa: ARG002 (a raw prompt has no tools)
    ) -> dict[str, Any]:
        echoed = self._echoed(index)
        return text_choice(
            index, echoed + (text or ""), finish, self._logprobs(logprobs, len(echoed))
        )

    def opening(self, index: int) -> dict[str, Any] | None:
        echoed = self._echoed(index)
        self._offsets[index] = len(echoed)
        return text_choice(index, echoed, None, None) if echoed else None

    def delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: tuple[TokenLogprob, ...],
        pieces: tuple[Piece, ...] = (),  # noqa: ARG002 (`chorus_pieces` is chat's extension)
    ) -> dict[str, Any]:
        start = self._offsets.get(index, len(self._echoed(index)))
        self._offsets[index] = start + sum(len(item.token) for item in logprobs)
        return text_choice(index, text, finish, self._logprobs(logprobs, start))

    def _logprobs(self, items: tuple[TokenLogprob, ...], start: int) -> dict[str, Any] | None:
        return legacy_logprobs(items, start) if self.logprobs else None


def text_choice(
    index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def legacy_logprobs(items: tuple[TokenLogprob, ...], start: int = 0) -> dict[str, Any]:
    """The legacy `logprobs` object. Each `top_logprobs` entry holds the most likely tokens and
    always the chosen one (so up to `logprobs + 1` entries, as OpenAI documents); `text_offset`
    is where each token starts, from `start` on."""
    offsets, tops = [], []
    offset = start
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
        top = {t.token: t.logprob for t in item.top}
        top.setdefault(item.token, item.logprob)
        tops.append(top)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": tops,
        "text_offset": offsets,
    }
