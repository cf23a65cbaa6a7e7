"""Ensembling: engines' seam, strategies over routed experts, and the values they exchange."""

from ensemble.engine import Engine
from ensemble.strategy import STRATEGIES, SingleStrategy, Strategy
from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "STRATEGIES",
    "ChatMessage",
    "Engine",
    "EnsembleTrace",
    "GenerationChunk",
    "GenerationRequest",
    "SamplingParams",
    "SingleStrategy",
    "Strategy",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]
