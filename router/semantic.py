from __future__ import annotations

from collections.abc import Sequence

from ensemble.types import ChatMessage
from router.artifact import RouterArtifact
from router.cluster import CostScale
from router.decision import RouteDecision
from router.embedder import BatchingEmbedder
from router.query import query_text


class SemanticRouter:
    """A pool's router at serving time: embed the conversation, then route on the artifact."""

    def __init__(
        self,
        artifact: RouterArtifact,
        embedder: BatchingEmbedder,
        *,
        top_k: int = 2,
        clusters_considered: int = 3,
        beta: float = 10.0,
        cost_scale: CostScale = "cluster",
        include_system: bool = False,
        history_turns: int = 0,
    ) -> None:
        self.artifact = artifact
        self.embedder = embedder
        self.top_k = top_k
        self.clusters_considered = clusters_considered
        self.beta = beta
        self.cost_scale: CostScale = cost_scale
        self.include_system = include_system
        self.history_turns = history_turns

    @property
    def cost_aware(self) -> bool:
        return self.artifact.router.has_costs

    async def route(
        self, messages: Sequence[ChatMessage], quality_weight: float = 1.0
    ) -> RouteDecision:
        text = query_text(
            messages, include_system=self.include_system, history_turns=self.history_turns
        )
        vector = await self.embedder.embed(text)
        return self.artifact.router.route(
            vector[None, :],
            top_k=self.top_k,
            clusters_considered=self.clusters_considered,
            beta=self.beta,
            quality_weight=quality_weight,
            cost_scale=self.cost_scale,
        )[0]
