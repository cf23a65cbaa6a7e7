"""Drafted fusion against step-by-step fusion on many public prompts: are the answers the same?

    .venv/bin/python loadtest/speculative_exactness.py [--per-category 6] [--tokens 24]

SmolLM2 and Gemma in process (`configs/default.yaml`). For the first `--per-category` questions
of each benchmark in the public test split, and for each variant (uniform greedy, gated 0.5
greedy, core sampled with a seed, a cascade greedy), the answer step by step and with drafts of
up to 8 pieces, each at most `--tokens` pieces. Prints one JSON line per question and variant as
it goes, then a summary: answers byte-identical per variant, and the drafts' acceptance.
`tests/integration/test_speculative_fusion.py` is the same check on three prompts, in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict
from collections.abc import Callable

from ensemble.cascade import CascadeStrategy
from ensemble.fuse import FusionStrategy
from ensemble.types import ChatMessage, EnsembleTrace, GenerationRequest, SamplingParams
from loadtest import ROOT
from loadtest.pair import start_pair
from serving.engines.transformers.engine import TransformersEngine

Strategy = FusionStrategy | CascadeStrategy
# name: (strategy with drafts of up to n pieces, temperature)
VARIANTS: dict[str, tuple[Callable[[int], Strategy], float]] = {
    "uniform": (lambda n: FusionStrategy(weighting="uniform", draft_tokens=n), 0.0),
    "gated-0.5": (lambda n: FusionStrategy(weighting="uniform", gate=0.5, draft_tokens=n), 0.0),
    "core-sampled": (lambda n: FusionStrategy(weighting="core", draft_tokens=n), 0.8),
    "cascade": (
        lambda n: CascadeStrategy(
            draft="smollm2-135m-instruct", window=2, threshold=1.0, draft_tokens=n
        ),
        0.0,
    ),
}


def questions(per_category: int) -> list[tuple[str, str]]:
    """(category, question) for the first questions of each benchmark in the test split."""
    taken: dict[str, int] = defaultdict(int)
    out = []
    with open(ROOT / "configs" / "data" / "public" / "test.jsonl") as records:
        for line in records:
            record = json.loads(line)
            if taken[record["category"]] < per_category:
                taken[record["category"]] += 1
                out.append((record["category"], record["question"]))
    return out


async def answer(
    strategy: Strategy, req: GenerationRequest, engines: list[TransformersEngine]
) -> tuple[str, float | None]:
    trace = EnsembleTrace()
    text = "".join([c.text async for c in strategy.run(req, engines, trace)])
    summary = trace.fusion or trace.cascade
    return text, summary.draft_acceptance if summary else None


async def main(per_category: int, tokens: int) -> None:
    engines = await start_pair()
    order = {"cascade": engines[::-1]}  # a cascade's strong expert first, its draft last
    same: dict[str, list[bool]] = defaultdict(list)
    accepted: dict[str, list[float]] = defaultdict(list)
    for category, question in questions(per_category):
        for name, (make, temperature) in VARIANTS.items():
            params = SamplingParams(max_tokens=tokens, temperature=temperature, seed=7)
            req = GenerationRequest("exactness", (ChatMessage("user", question),), params)
            experts = order.get(name, engines)
            stepwise, _ = await answer(make(1), req, experts)
            drafted, acceptance = await answer(make(8), req, experts)
            same[name].append(stepwise == drafted)
            if acceptance is not None:
                accepted[name].append(acceptance)
            row = {"category": category, "variant": name, "same": stepwise == drafted}
            print(json.dumps(row | {"acceptance": acceptance, "answer": stepwise}), flush=True)
    summary = {
        name: {
            "identical": f"{sum(flags)}/{len(flags)}",
            "acceptance": round(sum(accepted[name]) / max(len(accepted[name]), 1), 3),
        }
        for name, flags in same.items()
    }
    print(json.dumps({"summary": summary, "tokens": tokens}), flush=True)
    for engine in engines:
        await engine.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    asyncio.run(main(args.per_category, args.tokens))
