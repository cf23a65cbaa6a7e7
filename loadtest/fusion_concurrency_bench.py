"""Fusion throughput with concurrent requests against one request at a time.

    .venv/bin/python loadtest/fusion_concurrency_bench.py [--streams 8] [--tokens 48] [--rounds 2]

SmolLM2 and Gemma in-process (the default config's engines), fused greedily (uniform, and gated
at 0.5, the default `fuse` pool's gate). Each round, per variant: the prompts one after the other
(one stream), then all of them at once (`--streams` streams, one prompt each); tokens/s is fused
pieces per second over the whole phase. Rounds interleave the two phases, so both see the same
machine. The same script runs on another checkout with `PYTHONPATH=that-checkout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict

from ensemble.fuse import FusionStrategy
from ensemble.types import ChatMessage, EnsembleTrace, GenerationRequest, SamplingParams
from loadtest.pair import start_pair
from serving.engines.transformers.engine import TransformersEngine

PROMPTS = [
    "Write a long story about a lighthouse keeper and the sea.",
    "Explain how a bicycle works.",
    "Write a Python function that checks whether a number is prime.",
    "Describe the water cycle.",
    "Write a poem about autumn.",
    "Explain what a compiler does.",
    "Tell me about the history of Rome.",
    "Describe how bread is made.",
]
VARIANTS = {
    "uniform": FusionStrategy(weighting="uniform"),
    "gated-0.5": FusionStrategy(weighting="uniform", gate=0.5),
}


async def fused(
    strategy: FusionStrategy, prompt: str, tokens: int, engines: list[TransformersEngine]
) -> int:
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    req = GenerationRequest("bench", (ChatMessage("user", prompt),), params)
    trace = EnsembleTrace()
    async for _ in strategy.run(req, engines, trace):
        pass
    assert trace.fusion is not None
    return trace.fusion.steps


async def main(streams: int, tokens: int, rounds: int) -> None:
    engines = await start_pair()
    prompts = (PROMPTS * streams)[:streams]
    await fused(VARIANTS["uniform"], prompts[0], 4, engines)  # warm-up
    made: dict[str, int] = defaultdict(int)
    spent: dict[str, float] = defaultdict(float)
    for _ in range(rounds):
        for name, strategy in VARIANTS.items():
            started = time.perf_counter()
            for prompt in prompts:
                made[f"{name} x1"] += await fused(strategy, prompt, tokens, engines)
            spent[f"{name} x1"] += time.perf_counter() - started
            started = time.perf_counter()
            done = await asyncio.gather(*(fused(strategy, p, tokens, engines) for p in prompts))
            made[f"{name} x{streams}"] += sum(done)
            spent[f"{name} x{streams}"] += time.perf_counter() - started
    speed = {key: made[key] / spent[key] for key in made}
    report = {
        "tokens_per_s": {key: round(value, 2) for key, value in speed.items()},
        f"x{streams}_over_x1": {
            name: round(speed[f"{name} x{streams}"] / speed[f"{name} x1"], 2) for name in VARIANTS
        },
        "pieces": dict(made),
    }
    print(json.dumps(report, indent=2))
    for engine in engines:
        await engine.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.streams, args.tokens, args.rounds))
