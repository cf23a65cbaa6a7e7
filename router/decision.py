from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ensemble.types import ChatMessage


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Which experts should answer a query, best first, with the router's confidence in each."""

    experts: tuple[str, ...]
    weights: tuple[float, ...]
    cluster: int | None = None
    distance: float | None = None
    ood: bool = False
    expected_costs: tuple[float, ...] = ()
    """What each expert's answer is expected to cost (the router's calibrated means), when the
    router knows costs."""


class Router(Protocol):
    """Chooses a pool's experts for a conversation (`StaticRouter`, `SemanticRouter`)."""

    async def route(
        self, messages: Sequence[ChatMessage], quality_weight: float = 1.0
    ) -> RouteDecision: ...
