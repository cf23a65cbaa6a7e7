from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Which experts should answer a query, best first, with the router's confidence in each."""

    experts: tuple[str, ...]
    weights: tuple[float, ...]
    cluster: int | None = None
    distance: float | None = None
    ood: bool = False
