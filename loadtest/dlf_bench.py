"""Dynamic Logit Fusion's time per token against the large model's own, side by side.

    .venv/bin/python loadtest/dlf_bench.py [--config configs/weak-to-strong.yaml] [--pool dlf]
        [--tokens 48] [--rounds 1] [--drafts 1,4,8]

For every prompt, in turn: the large model alone (greedy, its engine's own `generate`), then the
pool's `dlf` strategy step by step and with drafts of up to each `--drafts` length (the large
model drafts, the base and the specialists score the draft in one pass each), all `--tokens`
long at most. Reports seconds per token of each and its ratio to the large model's, the mean
searched weight (alpha) of each specialist, and the drafts' acceptance; one JSON line per
variant, then a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

from ensemble.dlf import LogitFusionStrategy
from ensemble.types import ChatMessage, EnsembleTrace, GenerationRequest, SamplingParams
from loadtest import ROOT
from serving.config import DlfStrategyConfig, TransformersExpertConfig, load_config
from serving.engines.transformers.engine import TransformersEngine

PROMPTS = [
    "Write a story about a lighthouse keeper and the sea.",
    "Explain how a bicycle works.",
    "Write a Python function that checks whether a number is prime.",
    "Is the Pacific the largest ocean on Earth? Answer yes or no, then explain briefly.",
]


async def main(config_path: Path, pool: str, tokens: int, rounds: int, drafts: list[int]) -> None:
    config = load_config(config_path, check_artifacts=False)
    pool_config = config.pools[pool]
    strategy_config = pool_config.strategy
    assert isinstance(strategy_config, DlfStrategyConfig)
    engines = []
    for name in pool_config.experts:
        expert = config.experts[name]
        assert isinstance(expert, TransformersExpertConfig)
        engine = TransformersEngine(name, expert)
        await engine.start()
        engines.append(engine)
    large = next(e for e in engines if e.name == strategy_config.large)
    settings = strategy_config.model_dump(exclude={"type", "draft_tokens"})
    variants = {f"dlf-draft-{n}": LogitFusionStrategy(**settings, draft_tokens=n) for n in drafts}
    spent: dict[str, float] = defaultdict(float)
    made: dict[str, int] = defaultdict(int)
    alphas: dict[str, list[float]] = defaultdict(list)
    accepted: dict[str, list[float]] = defaultdict(list)
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    for _ in range(rounds):
        for prompt in PROMPTS:
            req = GenerationRequest("bench", (ChatMessage("user", prompt),), params)
            started = time.perf_counter()
            made["large"] += sum([c.tokens async for c in large.generate(req)])
            spent["large"] += time.perf_counter() - started
            for name, strategy in variants.items():
                trace = EnsembleTrace()
                started = time.perf_counter()
                async for _chunk in strategy.run(req, engines, trace):
                    pass
                spent[name] += time.perf_counter() - started
                assert trace.fusion is not None
                made[name] += trace.fusion.steps
                weights = dict(zip(trace.experts, trace.weights, strict=True))
                alphas[name].append(
                    sum(w for e, w in weights.items() if e not in (large.name, strategy.base))
                )
                if trace.fusion.draft_acceptance is not None:
                    accepted[name].append(trace.fusion.draft_acceptance)
    per_token = {name: spent[name] / max(made[name], 1) for name in spent}
    for name, seconds in per_token.items():
        row = {
            "variant": name,
            "tokens": made[name],
            "seconds_per_token": round(seconds, 4),
            "ratio_to_large": round(seconds / per_token["large"], 3),
        }
        if alphas.get(name):
            row["mean_alpha"] = round(sum(alphas[name]) / len(alphas[name]), 3)
        if accepted.get(name):
            row["draft_acceptance"] = round(sum(accepted[name]) / len(accepted[name]), 3)
        print(json.dumps(row), flush=True)
    for engine in engines:
        await engine.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "weak-to-strong.yaml")
    parser.add_argument("--pool", default="dlf")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--drafts", default="1,4,8")
    args = parser.parse_args()
    lengths = [int(n) for n in args.drafts.split(",")]
    asyncio.run(main(args.config, args.pool, args.tokens, args.rounds, lengths))
