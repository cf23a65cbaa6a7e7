"""What one config serves: its engines, and the pools (routers + strategies) over them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ensemble.engine import Engine
from ensemble.strategy import STRATEGIES, SingleStrategy, Strategy
from ensemble.types import ChatMessage
from router.decision import RouteDecision
from router.static import StaticRouter
from serving.config import Config
from serving.engines import build_engine
from serving.errors import ModelNotFoundError
from serving.metrics import GatewayMetrics

logger = logging.getLogger(__name__)


class Router(Protocol):
    async def route(self, messages: Sequence[ChatMessage]) -> RouteDecision: ...


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's `model` names: a pool, or one expert addressed directly."""

    model_id: str
    kind: str  # "pool" or "expert"
    experts: tuple[str, ...]
    router: Router
    strategy: Strategy


class Gateway:
    def __init__(
        self,
        config: Config,
        metrics: GatewayMetrics,
        engines: Mapping[str, Engine] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.engines: dict[str, Engine] = (
            dict(engines)
            if engines is not None
            else {name: build_engine(name, expert) for name, expert in config.experts.items()}
        )
        self.targets: dict[str, Target] = {}
        for name, pool in config.pools.items():
            self.targets[name] = Target(
                name, "pool", pool.experts, StaticRouter(pool.experts), STRATEGIES[pool.strategy]()
            )
        for name in config.experts:
            self.targets[name] = Target(
                name, "expert", (name,), StaticRouter([name]), SingleStrategy()
            )
        self.loading = True
        self.load_errors: dict[str, str] = {}
        for name in self.engines:
            metrics.expert_healthy.labels(name).set(0)

    async def start(self) -> None:
        """Load every engine; one that fails is reported and left out, the rest serve."""
        try:
            results = await asyncio.gather(
                *(engine.start() for engine in self.engines.values()), return_exceptions=True
            )
            for (name, _), result in zip(self.engines.items(), results, strict=True):
                if isinstance(result, BaseException):
                    logger.error("expert %s failed to load: %s", name, result)
                    self.load_errors[name] = str(result)
                else:
                    self.metrics.expert_healthy.labels(name).set(1)
        finally:
            self.loading = False

    async def aclose(self) -> None:
        await asyncio.gather(*(e.aclose() for e in self.engines.values()), return_exceptions=True)

    @property
    def ready(self) -> bool:
        """Loaded, and at least one pool (or expert) has an expert that can answer."""
        return not self.loading and any(
            self.engines[e].ready for t in self.targets.values() for e in t.experts
        )

    def target(self, model_id: str) -> Target:
        try:
            return self.targets[model_id]
        except KeyError:
            raise ModelNotFoundError(
                f"The model `{model_id}` does not exist. Known models: "
                f"{', '.join(sorted(self.targets))}.",
                param="model",
            ) from None
