"""Routing: which experts of a pool should answer a query (the Avengers recipe)."""

from router.artifact import ArtifactError, RouterArtifact, check_compatible
from router.cluster import ClusterRouter, NotFittedError
from router.decision import RouteDecision
from router.embedder import BatchingEmbedder, Embedder
from router.query import query_text
from router.semantic import SemanticRouter
from router.static import StaticRouter

__all__ = [
    "ArtifactError",
    "BatchingEmbedder",
    "ClusterRouter",
    "Embedder",
    "NotFittedError",
    "RouteDecision",
    "RouterArtifact",
    "SemanticRouter",
    "StaticRouter",
    "check_compatible",
    "query_text",
]
