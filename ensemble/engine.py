"""The Engine seam: one object per expert, whatever runs the model (transformers, vLLM, remote)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, runtime_checkable

from ensemble.types import GenerationChunk, GenerationRequest


@runtime_checkable
class Engine(Protocol):
    """An expert model.

    `generate` streams `GenerationChunk`s for all `n` samples of a request, interleaved, each
    sample ending with a chunk that has a `finish_reason`. Errors about the request itself (a prompt
    longer than the context window) are raised before the first chunk. Closing the iterator early
    stops the model work for that request.
    """

    name: str

    @property
    def ready(self) -> bool: ...

    @property
    def context_window(self) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...
