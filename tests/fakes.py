"""A scripted engine for tests of the server's own logic (faults, loading); never of a model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

from ensemble.types import GenerationChunk, GenerationRequest
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
