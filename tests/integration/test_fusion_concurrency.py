"""Concurrent fusion on the real bundled models: sessions stepped together change no answer.

Requests that fuse at the same time have their sessions' views computed in one forward per
engine (`serving.engines.transformers.views`). Each answer must be the one the request gets
alone, greedy and sampled with a seed, gated or not, and the sessions must really have shared
forwards (or the comparison would prove nothing).
"""

from __future__ import annotations

import asyncio

import pytest

from ensemble.fuse import FusionStrategy
from ensemble.types import ChatMessage, EnsembleTrace, GenerationRequest, SamplingParams
from serving.engines.transformers.engine import TransformersEngine

pytestmark = pytest.mark.integration

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Write a Python function that reverses a string.",
    "Explain why the sky is blue.",
    "Écris une phrase en français.",
]
# (weighting, gate, temperature)
VARIANTS = [("uniform", None, 0.0), ("uniform", 0.5, 0.0), ("core", None, 0.8)]


async def fused(
    strategy: FusionStrategy, req: GenerationRequest, engines: list[TransformersEngine]
) -> str:
    return "".join([c.text async for c in strategy.run(req, engines, EnsembleTrace())])


@pytest.mark.parametrize(("weighting", "gate", "temperature"), VARIANTS)
def test_concurrent_answers_are_the_ones_given_alone(
    fusion_pair: list[TransformersEngine], weighting: str, gate: float | None, temperature: float
) -> None:
    strategy = FusionStrategy(weighting=weighting, gate=gate)
    requests = [
        GenerationRequest(
            "test",
            (ChatMessage("user", prompt),),
            SamplingParams(max_tokens=24, temperature=temperature, seed=7),
        )
        for prompt in PROMPTS
    ]
    alone = [asyncio.run(fused(strategy, req, fusion_pair)) for req in requests]
    before = [engine.session_rows_batched for engine in fusion_pair]

    async def together() -> list[str]:
        return list(await asyncio.gather(*(fused(strategy, req, fusion_pair) for req in requests)))

    assert asyncio.run(together()) == alone
    shared = [
        engine.session_rows_batched - b for engine, b in zip(fusion_pair, before, strict=True)
    ]
    # The primary is asked at every step: a good share of its 4 x 24 steps ran together.
    assert shared[0] >= 24, shared
