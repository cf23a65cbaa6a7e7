from __future__ import annotations

from collections.abc import Sequence

from ensemble.types import ChatMessage
from router.decision import RouteDecision


class StaticRouter:
    """Ranks a pool's experts in the order the config lists them: the fallback with no artifact."""

    def __init__(self, experts: Sequence[str]) -> None:
        if not experts:
            raise ValueError("a router needs at least one expert")
        self._decision = RouteDecision(
            experts=tuple(experts), weights=tuple(1.0 / len(experts) for _ in experts)
        )

    async def route(
        self,
        messages: Sequence[ChatMessage],  # noqa: ARG002
        quality_weight: float = 1.0,  # noqa: ARG002
    ) -> RouteDecision:
        return self._decision
