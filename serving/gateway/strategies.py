"""A pool's strategy, built from its config (`single`, `vote`, `fuse`, `cascade`, `dlf`)."""

from __future__ import annotations

from ensemble.cascade import CascadeStrategy
from ensemble.dlf import LogitFusionStrategy
from ensemble.fuse import FusionStrategy
from ensemble.stepwise import StepObserver
from ensemble.strategy import SingleStrategy, Strategy
from ensemble.vote import VotingStrategy
from serving.config import (
    CascadeStrategyConfig,
    DlfStrategyConfig,
    FuseStrategyConfig,
    StrategyConfig,
    VoteStrategyConfig,
)


def build_strategy(config: StrategyConfig, observer: StepObserver | None = None) -> Strategy:
    settings = config.model_dump(exclude={"type"})
    if isinstance(config, VoteStrategyConfig):
        return VotingStrategy(**settings)
    if isinstance(config, FuseStrategyConfig):
        return FusionStrategy(**settings, observer=observer)
    if isinstance(config, CascadeStrategyConfig):
        return CascadeStrategy(**settings, observer=observer)
    if isinstance(config, DlfStrategyConfig):
        return LogitFusionStrategy(**settings, observer=observer)
    return SingleStrategy()
