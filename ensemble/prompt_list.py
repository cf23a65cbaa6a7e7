"""A list of prompts answered through one strategy (the legacy completions API's list `prompt`).

Prompt after prompt, not at once: a request with a list of prompts then holds the engine work
of one prompt at a time, so it costs no more than a request with one (the server's limits on
`n` and concurrency keep their meaning). Prompt `p`'s sample `i` is choice `p * n + i`, as in
OpenAI's API.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import replace

from ensemble.budget import Budget
from ensemble.engine import Engine
from ensemble.strategy import Strategy
from ensemble.types import EnsembleTrace, GenerationChunk, GenerationRequest


async def each_prompt(
    strategy: Strategy,
    requests: Sequence[GenerationRequest],
    experts: Sequence[Engine],
    trace: EnsembleTrace,
    budget: Budget | None = None,
) -> AsyncGenerator[GenerationChunk, None]:
    """Every request's chunks in turn, re-indexed to one choice per sample of each prompt; the
    pool's fan-out cap holds for each prompt."""
    for number, request in enumerate(requests):
        own = EnsembleTrace()
        if budget is not None:
            budget.next_prompt()
        try:
            async with aclosing(strategy.run(request, experts, own, budget)) as stream:
                async for chunk in stream:
                    yield replace(chunk, index=number * request.params.n + chunk.index)
        finally:
            merge_trace(trace, own)


def merge_trace(into: EnsembleTrace, other: EnsembleTrace) -> None:
    """Add `other`'s experts (each listed once, with its first weight) and failures."""
    for expert, weight in zip(other.experts, other.weights, strict=False):
        if expert not in into.experts:
            into.experts.append(expert)
            into.weights.append(weight)
    into.failed.extend(e for e in other.failed if e not in into.failed)
