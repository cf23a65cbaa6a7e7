"""The Strategy seam: how a pool's routed experts produce one answer."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from ensemble.engine import Engine
from ensemble.errors import ExpertFailed
from ensemble.structured import STRUCTURED
from ensemble.types import EnsembleTrace, GenerationChunk, GenerationRequest


class Strategy(Protocol):
    """Turns a request and the routed experts (best first) into one stream of chunks.

    A strategy records in `trace` which experts it used and with what weight; the server reports
    that to the client. Like an engine, it raises request errors before its first chunk.
    """

    name: str
    max_n: int | None  # the largest `n` it serves; None: any
    honours: frozenset[str]  # the structured request fields it serves (`ensemble.structured`)

    def run(
        self, request: GenerationRequest, experts: Sequence[Engine], trace: EnsembleTrace
    ) -> AsyncGenerator[GenerationChunk, None]: ...


class SingleStrategy:
    """The top routed expert answers alone, streaming natively.

    If it fails before producing anything, the next routed expert answers instead (the failed
    ones are listed in `trace.failed`); once output has been sent, a failure is final.
    """

    name = "single"
    max_n: int | None = None
    honours = STRUCTURED  # the answering expert's engine constrains and parses

    async def run(
        self, request: GenerationRequest, experts: Sequence[Engine], trace: EnsembleTrace
    ) -> AsyncGenerator[GenerationChunk, None]:
        for position, expert in enumerate(experts):
            answered = False
            try:
                async for chunk in expert.generate(request):
                    if not answered:
                        answered = True
                        trace.experts.append(expert.name)
                        trace.weights.append(1.0)
                    yield chunk
                return
            except ExpertFailed:
                if answered or position == len(experts) - 1:
                    raise
                trace.failed.append(expert.name)
