"""Engines wrapped for one traced request: each `generate` call is a `chorus.expert.generate` span,
each decode session a `chorus.expert.session` span (one per expert session, not one per token:
its steps are counted on it).

Wrapped per request, and only when the request is traced, so an untraced request calls its
engines directly."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Sequence
from contextlib import aclosing
from typing import TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from ensemble.engine import DecodeSession, Engine, LookaheadSession, SessionEngine
from ensemble.types import GenerationChunk, GenerationRequest, NextTokens
from serving.engines.common.delegating import DelegatingEngine, DelegatingSessionEngine

T = TypeVar("T")


def traced(engine: Engine, tracer: Tracer, parent: Context) -> Engine:
    if isinstance(engine, SessionEngine):
        return TracedSessionEngine(engine, tracer, parent)
    return TracedEngine(engine, tracer, parent)


def _failed(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


class TracedEngine(DelegatingEngine):
    """`engine`, whose calls are children of `parent`; everything else passes through."""

    def __init__(self, engine: Engine, tracer: Tracer, parent: Context) -> None:
        super().__init__(engine)
        self.tracer = tracer
        self.parent = parent

    def _span(self, name: str) -> Span:
        span = self.tracer.start_span(name, context=self.parent)
        span.set_attribute("chorus.expert", self.name)
        return span

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        span = self._span("chorus.expert.generate")
        span.set_attribute("chorus.samples", request.params.n)
        prompt = completion = 0
        try:
            async with aclosing(self.engine.generate(request)) as stream:
                async for chunk in stream:
                    prompt = max(prompt, chunk.prompt_tokens)
                    completion += chunk.tokens
                    yield chunk
        except Exception as exc:  # not a stream closed early, nor a cancel
            _failed(span, exc)
            raise
        finally:
            span.set_attributes(
                {"gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": completion}
            )
            span.end()


class TracedSessionEngine(TracedEngine, DelegatingSessionEngine):
    """A `SessionEngine` whose decode sessions are spans too."""

    engine: SessionEngine

    async def open_session(self, request: GenerationRequest) -> DecodeSession:
        span = self._span("chorus.expert.session")
        try:
            session = await self.engine.open_session(request)
        except Exception as exc:  # not a stream closed early, nor a cancel
            _failed(span, exc)
            span.end()
            raise
        span.set_attribute("gen_ai.usage.input_tokens", session.prompt_tokens)
        if isinstance(session, LookaheadSession):
            return _TracedLookahead(session, span)
        return _TracedSession(session, span)


class _TracedSession:
    """A decode session whose span ends when it closes, with its steps counted on it."""

    def __init__(self, session: DecodeSession, span: Span) -> None:
        self.session = session
        self.expert = session.expert
        self.prompt_tokens = session.prompt_tokens
        self.span = span
        self.views = 0  # top_k calls: the steps this expert was asked about
        self.extends = 0  # pieces of chosen text it was moved on by
        self.ended = False

    async def _guard(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except Exception as exc:  # not a stream closed early, nor a cancel
            if not self.ended:
                _failed(self.span, exc)
            raise

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:
        self.views += 1
        return await self._guard(self.session.top_k(k, full=full))

    async def extend(self, text: str) -> None:
        self.extends += 1
        await self._guard(self.session.extend(text))

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:
        self.extends += 1
        await self._guard(self.session.extend_ids(ids, text))

    async def aclose(self) -> None:
        try:
            await self.session.aclose()
        finally:
            if not self.ended:
                self.ended = True
                self.span.set_attributes(
                    {"chorus.session.views": self.views, "chorus.session.extends": self.extends}
                )
                self.span.end()


class _TracedLookahead(_TracedSession):
    session: LookaheadSession

    async def draft(self, n: int, k: int) -> list[NextTokens]:
        self.views += 1
        return await self._guard(self.session.draft(n, k))

    async def prefetch(
        self, pieces: Sequence[tuple[str, tuple[int, ...]]], *, every: bool = True
    ) -> None:
        await self._guard(self.session.prefetch(pieces, every=every))
