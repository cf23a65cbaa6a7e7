"""Fusion speed against each expert alone, side by side on the same prompts.

    .venv/bin/python loadtest/fusion_bench.py [--tokens 32] [--rounds 2]

For every prompt, in turn: SmolLM2 greedy, Gemma greedy, then fusion (uniform, core, gated
uniform at 0.5, and uniform and gated with drafts of up to 8 pieces), each `--tokens` long at
most; tokens/s is pieces chosen per second for fusion and tokens per second for the experts.
The two-expert ceiling when both run one after the other on the same cores is 1 / (1/a + 1/b)
for expert speeds a and b; fusion asks the experts at once, so it can pass that ceiling.
`drafts` gives, per prompt kind, the share of drafted pieces chosen as drafted (`acceptance`) and
the mean pieces drafted per round (`length`), over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict

from ensemble.fuse import FusionStrategy
from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    FusionSummary,
    GenerationRequest,
    SamplingParams,
)
from loadtest.pair import start_pair
from serving.engines.transformers.engine import TransformersEngine

PROMPTS = {  # by kind
    "story": "Write a long story about a lighthouse keeper and the sea.",
    "explanation": "Explain how a bicycle works.",
    "code": "Write a Python function that checks whether a number is prime.",
    "arithmetic": "What is 12 times 7?",
}
VARIANTS = {
    "uniform": FusionStrategy(weighting="uniform"),
    "core": FusionStrategy(weighting="core"),
    "gated-0.5": FusionStrategy(weighting="uniform", gate=0.5),
    "uniform-draft-8": FusionStrategy(weighting="uniform", draft_tokens=8),
    "gated-0.5-draft-8": FusionStrategy(weighting="uniform", gate=0.5, draft_tokens=8),
}


async def timed_greedy(engine: TransformersEngine, req: GenerationRequest) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = sum([c.tokens async for c in engine.generate(req)])
    return tokens, time.perf_counter() - started


async def timed_fusion(
    strategy: FusionStrategy, req: GenerationRequest, engines: list[TransformersEngine]
) -> tuple[int, float, FusionSummary]:
    trace = EnsembleTrace()
    started = time.perf_counter()
    async for _ in strategy.run(req, engines, trace):
        pass
    elapsed = time.perf_counter() - started
    assert trace.fusion is not None
    return trace.fusion.steps, elapsed, trace.fusion


async def main(tokens: int, rounds: int) -> None:
    smollm2, gemma = await start_pair()
    made: dict[str, int] = defaultdict(int)
    spent: dict[str, float] = defaultdict(float)
    skips: dict[str, list[float]] = defaultdict(list)
    drafts: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for _ in range(rounds):
        for kind, prompt in PROMPTS.items():
            params = SamplingParams(max_tokens=tokens, temperature=0.0)
            req = GenerationRequest("bench", (ChatMessage("user", prompt),), params)
            for name, engine in (("smollm2", smollm2), ("gemma", gemma)):
                n, seconds = await timed_greedy(engine, req)
                made[name] += n
                spent[name] += seconds
            for name, strategy in VARIANTS.items():
                n, seconds, details = await timed_fusion(strategy, req, [smollm2, gemma])
                made[name] += n
                spent[name] += seconds
                skips[name].append(details.gate_skip_rate)
                if details.draft_acceptance is not None and details.draft_length is not None:
                    drafts[name][kind].append((details.draft_acceptance, details.draft_length))
    speed = {name: made[name] / spent[name] for name in made}
    a, b = speed["smollm2"], speed["gemma"]
    ceiling = 1 / (1 / a + 1 / b)
    report = {
        "tokens_per_s": {k: round(v, 2) for k, v in speed.items()},
        "ceiling_tokens_per_s": round(ceiling, 2),
        "of_ceiling": {k: round(speed[k] / ceiling, 3) for k in VARIANTS},
        "of_slower_expert": {k: round(speed[k] / min(a, b), 3) for k in VARIANTS},
        "gate_skip_rate": {k: round(sum(v) / len(v), 3) for k, v in skips.items()},
        "drafts": {
            name: {
                kind: {
                    "acceptance": round(sum(a for a, _ in runs) / len(runs), 3),
                    "length": round(sum(n for _, n in runs) / len(runs), 2),
                }
                for kind, runs in by_kind.items()
            }
            for name, by_kind in drafts.items()
        },
    }
    print(json.dumps(report, indent=2))
    await smollm2.aclose()
    await gemma.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.tokens, args.rounds))
