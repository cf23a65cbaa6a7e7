"""Routing: which experts of a pool should answer a query."""

from router.decision import RouteDecision
from router.static import StaticRouter

__all__ = ["RouteDecision", "StaticRouter"]
