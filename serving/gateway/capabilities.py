"""Who can honour a request's structured fields (`tools`, `response_format`): the pool's
strategy, and each expert's engine. Never silently ignored: a field nobody can honour is a 400
that names it.

An engine says what it honours with a `honours` attribute (a frozenset of field names, known
once it is loaded: tools need a chat template that renders them); an engine without one
honours neither.
"""

from __future__ import annotations

from collections.abc import Sequence

from ensemble.engine import Engine
from ensemble.strategy import Strategy
from ensemble.structured import needs
from ensemble.types import GenerationRequest
from serving.api.errors import InvalidRequestError

_WHY = {
    "tools": "its chat template has no tool support (or its engine cannot parse tool calls)",
    "response_format": "its engine cannot constrain its output",
}


def honours(engine: Engine) -> frozenset[str]:
    value: frozenset[str] = getattr(engine, "honours", frozenset())
    return value


def check_strategy(model_id: str, strategy: Strategy, request: GenerationRequest) -> None:
    """A strategy that cannot honour a field the request uses refuses it."""
    for name in needs(request):
        if name not in getattr(strategy, "honours", frozenset()):
            raise InvalidRequestError(
                f"`{model_id}` is a `{strategy.name}` pool: its pieces are chosen across "
                f"experts, and no grammar masks them, so it cannot honour `{name}`",
                param=name,
            )


def able(
    model_id: str,
    routed: Sequence[Engine],
    others: Sequence[Engine],
    request: GenerationRequest,
) -> list[Engine]:
    """The experts, best first, that honour every field `request` uses: the routed ones that
    can, else the pool's other ones that can (a tool request goes only to an expert that can
    call tools). None can: a 400 naming the first field that none honours."""
    wanted = needs(request)
    if not wanted:
        return list(routed)
    fit = [e for e in routed if set(wanted) <= honours(e)]
    if fit:
        return fit
    fit = [e for e in others if e not in routed and set(wanted) <= honours(e)]
    if fit:
        return fit
    candidates = [*routed, *others]
    # Name a field none of them honours; else (each is honoured, never all together) the first.
    missing = next((n for n in wanted if not any(n in honours(e) for e in candidates)), wanted[0])
    if len({e.name for e in candidates}) == 1:
        message = f"the expert `{model_id}` cannot honour `{missing}`: {_WHY[missing]}"
    else:
        message = f"no expert of `{model_id}` can honour `{', '.join(wanted)}`"
    raise InvalidRequestError(message, param=missing)
