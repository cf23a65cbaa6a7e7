"""Per-expert timeouts around any engine.

An expert that takes longer than `first_token_timeout_s` to start answering, or stalls longer than
`token_timeout_s` between two pieces of output, is cut off: its stream is closed (which stops its
work) and an `ExpertTimedOut` raised, so strategies treat it like any failed expert (fall back,
or continue with the experts left). The same limits apply to decode sessions: the first view of
the next token may take `first_token_timeout_s` (prefill), every later call `token_timeout_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing
from typing import TypeVar

from ensemble.engine import DecodeSession, Engine, LookaheadSession, SessionEngine
from ensemble.errors import ExpertTimedOut
from ensemble.types import GenerationChunk, GenerationRequest, NextTokens
from serving.engines.common.delegating import DelegatingEngine, DelegatingSessionEngine

T = TypeVar("T")


class SupervisedEngine(DelegatingEngine):
    """`engine` with timeouts; everything else passes through."""

    def __init__(self, engine: Engine, first_token_timeout_s: float, token_timeout_s: float):
        super().__init__(engine)
        self.first_token_timeout_s = first_token_timeout_s
        self.token_timeout_s = token_timeout_s

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        limit = self.first_token_timeout_s
        async with aclosing(self.engine.generate(request)) as stream:
            while True:
                try:
                    chunk = await _within(anext(stream), limit, self.name, "output")
                except StopAsyncIteration:
                    return
                limit = self.token_timeout_s
                yield chunk


class SupervisedSessionEngine(SupervisedEngine, DelegatingSessionEngine):
    """A `SessionEngine` with timeouts on its sessions too."""

    engine: SessionEngine

    async def open_session(self, request: GenerationRequest) -> DecodeSession:
        session = await _within(
            self.engine.open_session(request), self.first_token_timeout_s, self.name, "a session"
        )
        if isinstance(session, LookaheadSession):
            return _SupervisedLookahead(session, self)
        return _SupervisedSession(session, self)


class _SupervisedSession:
    def __init__(self, session: DecodeSession, owner: SupervisedEngine) -> None:
        self.session = session
        self.expert = session.expert
        self.prompt_tokens = session.prompt_tokens
        self._owner = owner
        self._limit = owner.first_token_timeout_s  # the first view pays for the prefill

    async def _call(self, work: Awaitable[T]) -> T:
        result = await _within(work, self._limit, self.expert, "its next token")
        self._limit = self._owner.token_timeout_s
        return result

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:
        return await self._call(self.session.top_k(k, full=full))

    async def extend(self, text: str) -> None:
        await self._call(self.session.extend(text))

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        await self._call(self.session.extend_ids(ids, text))

    async def aclose(self) -> None:
        await self.session.aclose()


class _SupervisedLookahead(_SupervisedSession):
    session: LookaheadSession

    async def draft(self, n: int, k: int) -> list[NextTokens]:
        # n steps of the model: n times the limit of one.
        result = await _within(
            self.session.draft(n, k), self._limit * n, self.expert, "draft of its next tokens"
        )
        self._limit = self._owner.token_timeout_s
        return result

    async def prefetch(
        self, pieces: Sequence[tuple[str, tuple[int, ...]]], *, every: bool = True
    ) -> None:
        await self._call(self.session.prefetch(pieces, every=every))


async def _within(work: Awaitable[T], seconds: float, expert: str, what: str) -> T:
    try:
        async with asyncio.timeout(seconds):  # unlike wait_for, no task per call (per token)
            return await work
    except TimeoutError:
        raise ExpertTimedOut(f"expert {expert} timed out: no {what} within {seconds:g}s") from None


def supervise(engine: Engine, first_token_timeout_s: float, token_timeout_s: float) -> Engine:
    if isinstance(engine, SessionEngine):
        return SupervisedSessionEngine(engine, first_token_timeout_s, token_timeout_s)
    return SupervisedEngine(engine, first_token_timeout_s, token_timeout_s)
