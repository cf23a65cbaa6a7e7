"""A scripted engine for tests of the server's own logic (faults, loading); never of a model."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncGenerator

from ensemble.errors import ExpertFailed
from ensemble.types import Candidate, GenerationChunk, GenerationRequest, NextTokens, TokenLogprob


class FakeEngine:
    def __init__(
        self,
        name: str,
        words: list[str],
        *,
        fail_after: int | None = None,
        stall_after: int | None = None,
        loaded: threading.Event | None = None,
    ) -> None:
        self.name = name
        self.words = words
        self.fail_after = fail_after
        self.stall_after = stall_after
        self.loaded = loaded
        self.active = 0  # generations running now
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def context_window(self) -> int:
        return 1024

    async def start(self) -> None:
        while self.loaded is not None and not self.loaded.is_set():
            await asyncio.sleep(0.01)
        self._ready = True

    async def aclose(self) -> None:
        self._ready = False

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(request.messages)  # what its chunks report

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.active += 1
        try:
            for i, word in enumerate(self.words):
                if i == self.fail_after:
                    raise ExpertFailed(f"expert {self.name} failed: scripted")
                if i == self.stall_after:
                    await asyncio.sleep(3600)
                last = i == len(self.words) - 1
                yield GenerationChunk(
                    expert=self.name,
                    index=0,
                    text=word,
                    tokens=1,
                    prompt_tokens=len(request.messages),
                    finish_reason="stop" if last else None,
                )
        finally:
            self.active -= 1


class ScriptedSamples:
    """An engine whose n samples are scripted replies, each with a given token log-probability."""

    def __init__(
        self, name: str, replies: list[tuple[str, float]], *, delay_s: float = 0.0
    ) -> None:
        self.name = name
        self.replies = replies
        self.delay_s = delay_s
        self.calls: list[GenerationRequest] = []

    @property
    def ready(self) -> bool:
        return True

    @property
    def context_window(self) -> int:
        return 1024

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:  # noqa: ARG002
        return 7  # what its chunks report

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.calls.append(request)
        for i in range(request.params.n):
            text, logprob = self.replies[i % len(self.replies)]
            await asyncio.sleep(self.delay_s)
            yield GenerationChunk(
                expert=self.name,
                index=i,
                text=text,
                tokens=2,
                prompt_tokens=7,
                logprobs=(TokenLogprob(text, logprob),),
                finish_reason="stop",
            )


class ScriptedSessionEngine:
    """An engine whose decode sessions propose `text` one character a step (probability 0.9),
    then end. `fail_at` makes step number `fail_at` (from 0) raise `ExpertFailed`; `stall_at`
    makes it hang instead. Sessions record the text they were given."""

    def __init__(
        self,
        name: str,
        text: str,
        *,
        fail_at: int | None = None,
        stall_at: int | None = None,
        fail_open: bool = False,
    ) -> None:
        self.name = name
        self.text = text
        self.fail_at = fail_at
        self.stall_at = stall_at
        self.fail_open = fail_open
        self.sessions: list[ScriptedSession] = []

    ready = True
    context_window = 1024
    vocabulary = "chars"
    default_stop: tuple[str, ...] = ()

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:  # noqa: ARG002
        return 3  # what its sessions report

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:  # noqa: ARG002
        raise NotImplementedError
        yield  # pragma: no cover

    async def open_session(self, request: GenerationRequest) -> ScriptedSession:  # noqa: ARG002
        if self.fail_open:
            raise ExpertFailed(f"expert {self.name} failed: scripted")
        session = ScriptedSession(self)
        self.sessions.append(session)
        return session


class ScriptedSession:
    def __init__(self, engine: ScriptedSessionEngine) -> None:
        self.engine = engine
        self.expert = engine.name
        self.prompt_tokens = 3
        self.seen = ""
        self.steps = 0
        self.closed = False

    async def top_k(self, k: int, *, full: bool = False) -> NextTokens:  # noqa: ARG002
        step, self.steps = self.steps, self.steps + 1
        if step == self.engine.fail_at:
            raise ExpertFailed(f"expert {self.expert} failed: scripted")
        if step == self.engine.stall_at:
            await asyncio.sleep(3600)
        position = len(self.seen)
        if position >= len(self.engine.text):
            return NextTokens((Candidate("", 0.0, end=True),), 0.0)
        char = self.engine.text[position]
        other = Candidate("#", math.log(0.1))
        return NextTokens((Candidate(char, math.log(0.9)), other), 0.33)

    async def extend(self, text: str) -> None:
        self.seen += text

    async def extend_ids(self, ids: tuple[int, ...], text: str) -> None:  # noqa: ARG002
        self.seen += text

    async def aclose(self) -> None:
        self.closed = True
