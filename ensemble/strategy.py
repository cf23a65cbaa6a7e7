"""The Strategy seam: how a pool's routed experts produce one answer."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from ensemble.engine import Engine
from ensemble.types import EnsembleTrace, GenerationChunk, GenerationRequest


class Strategy(Protocol):
    """Turns a request and the routed experts (best first) into one stream of chunks.

    A strategy records in `trace` which experts it used and with what weight; the server reports
    that to the client. Like an engine, it raises request errors before its first chunk.
    """

    name: str
    max_n: int | None  # the largest `n` it serves; None: any

    def run(
        self, request: GenerationRequest, experts: Sequence[Engine], trace: EnsembleTrace
    ) -> AsyncGenerator[GenerationChunk, None]: ...


class SingleStrategy:
    """The top routed expert answers alone, streaming natively."""

    name = "single"
    max_n: int | None = None

    async def run(
        self, request: GenerationRequest, experts: Sequence[Engine], trace: EnsembleTrace
    ) -> AsyncGenerator[GenerationChunk, None]:
        expert = experts[0]
        trace.experts.append(expert.name)
        trace.weights.append(1.0)
        async for chunk in expert.generate(request):
            yield chunk
