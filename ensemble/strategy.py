"""The Strategy seam: how a pool's routed experts produce one answer."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from ensemble.budget import Budget, CallKind
from ensemble.engine import Engine
from ensemble.errors import ExpertFailed
from ensemble.structured import STRUCTURED
from ensemble.types import EnsembleTrace, GenerationChunk, GenerationRequest


class Strategy(Protocol):
    """Turns a request and the routed experts (best first) into one stream of chunks.

    A strategy records in `trace` which experts it used and with what weight; the server reports
    that to the client. Like an engine, it raises request errors before its first chunk. It
    starts no model call that `budget` (the request's `max_cost` and the pool's `max_fan_out`)
    does not admit; none: no limits.
    """

    name: str
    max_n: int | None  # the largest `n` it serves; None: any
    honours: frozenset[str]  # the structured request fields it serves (`ensemble.structured`)

    def run(
        self,
        request: GenerationRequest,
        experts: Sequence[Engine],
        trace: EnsembleTrace,
        budget: Budget | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]: ...


class SingleStrategy:
    """The top routed expert answers alone, streaming natively.

    If it fails before producing anything, the next routed expert answers instead (the failed
    ones are listed in `trace.failed`); once output has been sent, a failure is final. An
    expert the budget does not admit is passed over, as first choice or as fallback.
    """

    name = "single"
    max_n: int | None = None
    honours = STRUCTURED  # the answering expert's engine constrains and parses

    async def run(
        self,
        request: GenerationRequest,
        experts: Sequence[Engine],
        trace: EnsembleTrace,
        budget: Budget | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        budget = budget or Budget()
        failure: ExpertFailed | None = None
        for expert in experts:
            grant, answered = None, False
            try:
                call: CallKind = "answer" if failure is None else "fallback"
                grant = await budget.admit(expert, request, call)
                if grant is None:
                    continue
                async for chunk in expert.generate(grant.request):
                    if not answered:
                        answered = True
                        trace.experts.append(expert.name)
                        trace.weights.append(1.0)
                    yield chunk
                return
            except ExpertFailed as exc:  # pricing it (counting its prompt) may fail too
                if answered:
                    raise
                if grant is not None:
                    budget.release(grant)  # nothing of it was sent, so nothing is accounted
                trace.failed.append(expert.name)
                failure = exc
        if failure is not None:
            raise budget.explain(failure)
        if budget.skipped:
            raise budget.refusal()
