"""What one config serves: its engines, and the pools (routers + strategies) over them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ensemble.engine import Engine
from ensemble.stepwise import Step, session_engines
from ensemble.strategy import SingleStrategy, Strategy
from router import artifact
from router.costs import CostModel
from router.decision import Router
from router.embedder import BatchingEmbedder
from router.semantic import SemanticRouter
from router.static import StaticRouter
from serving.api.errors import ModelNotFoundError
from serving.config import (
    CascadeStrategyConfig,
    Config,
    DlfStrategyConfig,
    FuseStrategyConfig,
    PoolConfig,
)
from serving.config.loading import priced
from serving.engines import build_engine
from serving.engines.common.supervised import supervise
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.strategies import build_strategy
from serving.models.embedders import load_embedder

logger = logging.getLogger(__name__)
EMBEDDER = "embedder"


@dataclass(frozen=True, slots=True)
class Target:
    """What a request's `model` names: a pool, or one expert addressed directly."""

    model_id: str
    kind: str  # "pool" or "expert"
    experts: tuple[str, ...]
    router: Router
    strategy: Strategy
    quality_weight: float = 1.0  # the pool's; a request may override it
    cost_aware: bool = False  # its router can trade accuracy for cost
    max_fan_out: int | None = None  # the most model calls one request may make; None: no cap


class Gateway:
    def __init__(
        self,
        config: Config,
        metrics: GatewayMetrics,
        engines: Mapping[str, Engine] | None = None,
        *,
        previous: Gateway | None = None,
    ) -> None:
        """`engines` replaces the configured ones (tests, embedding). With `previous` (a reload),
        experts whose settings did not change keep their loaded engine, and the embedder too."""
        self.config = config
        self.metrics = metrics
        self.reused = previous.reusable(config) if previous is not None else {}
        self.engines: dict[str, Engine] = dict(self.reused)
        for name, expert in config.experts.items():
            if name not in self.engines:
                engine = engines[name] if engines is not None else build_engine(name, expert)
                self.engines[name] = supervise(
                    engine, expert.first_token_timeout_s, expert.token_timeout_s
                )
        self.embedder: BatchingEmbedder = (
            previous.embedder
            if previous is not None and previous.config.router == config.router
            else BatchingEmbedder(
                wait_ms=config.router.batch_wait_ms, max_batch=config.router.max_batch
            )
        )
        self.needs_embedder = any(pool.router is not None for pool in config.pools.values())
        self.targets: dict[str, Target] = {}
        for name, pool in config.pools.items():
            router = self._router(pool)
            self.targets[name] = Target(
                name,
                "pool",
                pool.experts,
                router,
                build_strategy(pool.strategy, partial(self._observe_step, name)),
                pool.quality_weight,
                isinstance(router, SemanticRouter) and router.cost_aware,
                pool.max_fan_out,
            )
        self.costs = self._cost_models()
        for name in config.experts:
            self.targets[name] = Target(
                name, "expert", (name,), StaticRouter([name]), SingleStrategy()
            )
        self.loading = True
        self.load_errors: dict[str, str] = {}
        self.inflight = 0  # requests started on this gateway and not yet finished

    def reusable(self, config: Config) -> dict[str, Engine]:
        """Loaded engines whose expert settings are the same in `config`."""
        return {
            name: engine
            for name, engine in self.engines.items()
            if config.experts.get(name) == self.config.experts[name] and engine.ready
        }

    def _observe_step(self, pool: str, step: Step) -> None:
        self.metrics.fusion_steps.labels(pool).inc()
        self.metrics.fusion_step_seconds.labels(pool).observe(step.seconds)
        # The skip series exists from a pool's first step, so a skip share of 0 reads as 0.
        skips = self.metrics.fusion_gate_skips.labels(pool)
        if step.gated:
            skips.inc()

    def _cost_models(self) -> dict[str, CostModel]:
        """Each expert's cost: its price, else what a router's calibration measured for it
        (experts with neither have no cost)."""
        costs = {
            name: priced(expert.price)
            for name, expert in self.config.experts.items()
            if expert.price is not None
        }
        for target in self.targets.values():
            if isinstance(target.router, SemanticRouter):
                for name, model in target.router.artifact.costs.items():
                    costs.setdefault(name, model)
        return costs

    def _router(self, pool: PoolConfig) -> Router:
        if pool.router is None:
            return StaticRouter(pool.experts)
        settings = self.config.router
        return SemanticRouter(
            artifact.load(Path(pool.router.artifact)),
            self.embedder,
            top_k=pool.router.top_k,
            clusters_considered=pool.router.clusters_considered,
            beta=pool.router.beta,
            cost_scale=pool.router.cost_scale,
            include_system=settings.include_system,
            history_turns=settings.history_turns,
        )

    async def start(self) -> None:
        """Load the embedder and every engine; one that fails is reported and left out."""
        loads = {
            name: engine.start() for name, engine in self.engines.items() if name not in self.reused
        }
        if self.needs_embedder and self.embedder.embedder is None:
            loads[EMBEDDER] = self.embedder.load(
                partial(load_embedder, self.config.router.embedder, self.config.router.backend)
            )
        try:
            results = await asyncio.gather(*loads.values(), return_exceptions=True)
            for name, result in zip(loads, results, strict=True):
                if isinstance(result, BaseException):
                    logger.error("%s failed to load: %s", name, result)
                    self.load_errors[name] = str(result)
            self._check_token_level_pools()
        finally:
            self.loading = False

    def _check_token_level_pools(self) -> None:
        """What the config cannot tell before the engines exist: `fuse`, `cascade` and `dlf`
        need decode sessions, `kl_centroid` and `dlf` fusion one vocabulary (known once
        tokenizers are loaded). A pool that fails is refused here, at start-up, not on each
        request."""
        for name, pool in self.config.pools.items():
            strategy = pool.strategy
            if not isinstance(
                strategy, FuseStrategyConfig | CascadeStrategyConfig | DlfStrategyConfig
            ):
                continue
            try:
                engines = session_engines([self.engines[e] for e in pool.experts], strategy.type)
            except TypeError as exc:
                self.load_errors[name] = str(exc)
                engines = []
            shared = isinstance(strategy, DlfStrategyConfig) or (
                isinstance(strategy, FuseStrategyConfig) and strategy.weighting == "kl_centroid"
            )
            vocabularies = {e.name: e.vocabulary for e in engines if e.ready}
            if shared and len(set(vocabularies.values())) > 1:
                groups: dict[str, list[str]] = {}
                for expert, vocabulary in vocabularies.items():
                    groups.setdefault(vocabulary, []).append(expert)
                self.load_errors[name] = (
                    f"pools.{name}.experts: `{strategy.type}` fusion of whole distributions "
                    "needs experts that share one vocabulary; these tokenizers differ: "
                    + " / ".join(", ".join(g) for g in groups.values())
                )
            if name in self.load_errors:
                logger.error("pool %s cannot serve: %s", name, self.load_errors[name])

    async def aclose(self, keep: Gateway | None = None) -> None:
        """Close engines and the embedder, except those `keep` (the next gateway) took over."""
        kept = set(map(id, keep.engines.values())) if keep is not None else set()
        closing = [e.aclose() for e in self.engines.values() if id(e) not in kept]
        if keep is None or keep.embedder is not self.embedder:
            closing.append(self.embedder.aclose())
        await asyncio.gather(*closing, return_exceptions=True)

    def can_serve(self, target: Target) -> bool:
        if target.kind == "pool" and target.model_id in self.load_errors:
            return False
        if isinstance(target.router, SemanticRouter) and self.embedder.embedder is None:
            return False
        return any(self.engines[e].ready for e in target.experts)

    @property
    def ready(self) -> bool:
        """Loaded, and at least one pool (or expert) can answer."""
        return not self.loading and any(self.can_serve(t) for t in self.targets.values())

    def target(self, model_id: str) -> Target:
        try:
            return self.targets[model_id]
        except KeyError:
            raise ModelNotFoundError(
                f"The model `{model_id}` does not exist. Known models: "
                f"{', '.join(sorted(self.targets))}.",
                param="model",
            ) from None
