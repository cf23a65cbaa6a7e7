"""The transformers engine against transformers' own `generate`, same model, prompts and length.

    .venv/bin/python loadtest/engine_overhead.py [--config configs/default.yaml] [--tokens 64]

Greedy, one stream, exactly `--tokens` new tokens each (end-of-sequence suppressed on both sides
by asking `generate` for min_new_tokens and the engine for prompts that run long). Runs alternate
between the two so machine noise hits both alike; prints tokens/s for each and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from loadtest import ROOT
from serving.config import TransformersExpertConfig, load_config
from serving.engines.transformers.engine import TransformersEngine

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a bicycle works.",
    "List many facts about the Moon.",
]


async def engine_run(engine: TransformersEngine, req: GenerationRequest) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = 0
    async for chunk in engine.generate(req):
        tokens += chunk.tokens
    return tokens, time.perf_counter() - started


def generate_run(engine: TransformersEngine, req: GenerationRequest, tokens: int) -> float:
    ids = torch.tensor([engine.encode_prompt(req)])
    started = time.perf_counter()
    with torch.inference_mode():
        engine._model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config)
    for name, expert in config.experts.items():
        assert isinstance(expert, TransformersExpertConfig), f"{name}: not a transformers expert"
        engine = TransformersEngine(name, expert)
        asyncio.run(engine.start())
        ours, theirs = [], []
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                req = GenerationRequest(
                    "bench",
                    (ChatMessage("user", prompt),),
                    SamplingParams(max_tokens=args.tokens, temperature=0.0),
                )
                made, seconds = asyncio.run(engine_run(engine, req))
                ours.append(made / seconds)
                theirs.append(args.tokens / generate_run(engine, req, args.tokens))
        asyncio.run(engine.aclose())
        row = {
            "expert": name,
            "engine_tokens_per_s": round(statistics.median(ours), 1),
            "generate_tokens_per_s": round(statistics.median(theirs), 1),
            "ratio": round(statistics.median(ours) / statistics.median(theirs), 3),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
