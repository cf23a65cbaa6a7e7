"""Drafts: an expert's own greedy continuation, asked for several tokens at once, so that a
decode session pays one request for several views of the next step (vLLM in process and behind
`vllm serve`).

One request decodes the expert's greedy path from the answer so far, up to a lookahead of tokens,
with the top log-probabilities at every position. While the chosen text follows that path (the
expert decides alone on gated steps, the others agree with it, a one-expert cascade), the next
views are read off the draft with no request; when the text leaves it, the session drops it and
drafts again from the new text.

How far to draft (`next_lookahead`), after each draft: doubled, up to the session's maximum,
after a draft the answer followed to its end; cut to the views it gave (at least 1) after one
the answer left early. So a path that keeps following pays one request per `maximum` tokens, and
one that leaves every draft at once pays for one token per draft, not `maximum`. Where it starts
depends on how a draft arrives: streamed (vLLM in process), its first view comes after one token
whatever its length, so the first draft is of the maximum; whole (an HTTP answer), its first view
waits for all of it, so the first draft is of one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Mapping, Sequence

View = Mapping[int, float]  # {token id: logprob}: the top entries of one next-token distribution
Steps = AsyncGenerator[tuple[Sequence[int], Sequence[View]], None]  # tokens and views as they come


class Draft:
    """The greedy path from `base`: `views[j]` is the next-token distribution after
    `base + tokens[:j]` (so `tokens[j]` is its top entry). Whole when it is made (`done`: an
    answer that holds it all) or filled in the background as a stream delivers it
    (`streaming`: the first view is there after one token)."""

    def __init__(self, base: Sequence[int], *, full: bool = False) -> None:
        self.base = list(base)
        self.full = full  # its views are whole distributions
        self.tokens: list[int] = []
        self.views: list[View] = []
        self.used = 0  # views handed out (the furthest one, plus one)
        self.finished = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def done(cls, base: Sequence[int], tokens: Sequence[int], views: Sequence[View]) -> Draft:
        draft = cls(base)
        draft._add(tokens, views)
        draft.finished = True
        return draft

    @classmethod
    def streaming(cls, base: Sequence[int], steps: Steps, *, full: bool = False) -> Draft:
        """A draft filled from `steps` by a task of its own; `cancel` closes `steps`."""
        draft = cls(base, full=full)
        draft._task = asyncio.create_task(draft._consume(steps))
        return draft

    def _add(self, tokens: Sequence[int], views: Sequence[View]) -> None:
        for token, view in zip(tokens, views, strict=False):
            self.tokens.append(int(token))
            self.views.append(view)

    async def _consume(self, steps: Steps) -> None:
        try:
            async for tokens, views in steps:
                self._add(tokens, views)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
        finally:
            self.finished = True
            self._changed.set()
            await steps.aclose()

    async def _wait(self, tokens: int) -> None:
        while len(self.tokens) < tokens and not self.finished:
            self._changed.clear()
            await self._changed.wait()

    async def view_for(self, ids: Sequence[int]) -> View | None:
        """The view after `ids` if they follow this draft (waiting for it to get there)."""
        n = len(self.base)
        if len(ids) < n or list(ids[:n]) != self.base:
            return None
        rest = list(ids[n:])
        while True:
            known = min(len(self.tokens), len(rest))
            if self.tokens[:known] != rest[:known]:
                return None  # the path left the draft (no need to wait for more of it)
            if len(self.views) > len(rest):
                break
            if self.finished:
                return None
            self._changed.clear()
            await self._changed.wait()
        self.used = max(self.used, len(rest) + 1)
        return self.views[len(rest)]

    def followed_to_end(self, ids: Sequence[int]) -> bool:
        """`ids` went along the whole (finished) draft."""
        path = self.base + self.tokens
        return self.finished and len(ids) >= len(path) and list(ids[: len(path)]) == path

    async def path_from(self, ids: Sequence[int], tokens: int) -> list[tuple[int, float]]:
        """Up to `tokens` of the draft's own path from `ids` (on it), with their logprobs."""
        offset = len(ids) - len(self.base)
        await self._wait(offset + tokens)
        return [
            (token, self.views[i].get(token, -math.inf))
            for i, token in enumerate(self.tokens[offset : offset + tokens], start=offset)
        ]

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def next_lookahead(draft: Draft, ids: Sequence[int], lookahead: int, maximum: int) -> int:
    """How far the next draft goes, after `draft` and the answer `ids` (see the module
    docstring)."""
    if draft.followed_to_end(ids):
        return max(1, min(maximum, lookahead * 2))
    return max(1, min(maximum, draft.used))
