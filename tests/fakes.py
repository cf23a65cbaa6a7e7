"""A scripted engine for tests of the server's own logic (faults, loading); never of a model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

from ensemble.types import GenerationChunk, GenerationRequest, TokenLogprob
from serving.errors import ExpertError


class FakeEngine:
    def __init__(
        self,
        name: str,
        words: list[str],
        *,
        fail_after: int | None = None,
        loaded: threading.Event | None = None,
    ) -> None:
        self.name = name
        self.words = words
        self.fail_after = fail_after
        self.loaded = loaded
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

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        for i, word in enumerate(self.words):
            if self.fail_after is not None and i == self.fail_after:
                raise ExpertError(f"expert {self.name} failed: scripted")
            last = i == len(self.words) - 1
            yield GenerationChunk(
                expert=self.name,
                index=0,
                text=word,
                tokens=1,
                prompt_tokens=len(request.messages),
                finish_reason="stop" if last else None,
            )


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
