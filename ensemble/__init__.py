"""Ensembling: engines' seam, strategies over routed experts, and the values they exchange."""

from ensemble.engine import Engine
from ensemble.strategy import SingleStrategy, Strategy
from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from ensemble.vote import VotingStrategy

__all__ = [
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
    "VotingStrategy",
]
