"""What constrained decoding (xgrammar masks) adds per token on the transformers engine, side by
side with unconstrained decoding in one run, same expert and prompt.

    .venv/bin/python loadtest/constrained_bench.py [--expert smollm2-135m-instruct] [--tokens 48]

Greedy, one stream. The constrained request asks for a JSON object with a long string field
(`json_schema`), so both run to `--tokens` (finish `length`); the decode time per token is the
time from the first chunk to the last over the tokens after the first (the prefill left out).
Runs alternate so machine noise hits both alike. Also prints the schema's first compile and a
cached one, and the mask alone: the grammar's work per token (fill the row's bitmask, apply it
to a vocabulary-wide logits row, advance the matcher) over the tokens of a valid document,
without the model, which end-to-end timings on a busy machine cannot resolve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ensemble.structured import constraint_of
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from loadtest import ROOT
from serving.config import TransformersExpertConfig, load_config
from serving.engines.transformers.engine import TransformersEngine
from serving.engines.transformers.grammar import RowMasks

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
PROMPT = "Write a long story about a lighthouse keeper, as JSON with a title and the story."


async def per_token_ms(engine: TransformersEngine, req: GenerationRequest) -> tuple[float, int]:
    first = last = 0.0
    tokens = 0
    async for chunk in engine.generate(req):
        last = time.perf_counter()
        first = first or last
        tokens += chunk.tokens
    return (last - first) * 1000 / max(tokens - 1, 1), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--expert", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    expert = load_config(args.config).experts[args.expert]
    assert isinstance(expert, TransformersExpertConfig), "a transformers expert"
    engine = TransformersEngine(args.expert, expert)
    asyncio.run(engine.start())
    free = GenerationRequest(
        "bench",
        (ChatMessage("user", PROMPT),),
        SamplingParams(max_tokens=args.tokens, temperature=0.0),
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
    constrained = replace(free, response_format=fmt)

    constraint = constraint_of(constrained)
    assert constraint is not None and engine._grammars is not None
    compile_ms = []
    for _ in range(2):  # the first compiles, the second is the cache's
        started = time.perf_counter()
        engine._grammars.compile(constraint)
        compile_ms.append((time.perf_counter() - started) * 1000)

    document = json.dumps({"title": "The Keeper", "story": "He lit the lamp every night. " * 8})
    ids = engine._tokenizer.encode(document, add_special_tokens=False)
    vocab = engine._grammars.vocab_size
    masks = RowMasks(engine._grammars.compile(constraint), 1, vocab)
    logits = torch.zeros(1, vocab)
    started = time.perf_counter()
    for token in ids:
        masks.mask(logits, [0])
        masks.accept(0, token)
    mask_us = (time.perf_counter() - started) * 1e6 / len(ids)

    asyncio.run(per_token_ms(engine, free))  # warm-up
    results: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    counts: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, req in (("unconstrained", free), ("constrained", constrained)):
            ms, tokens = asyncio.run(per_token_ms(engine, req))
            results[name].append(ms)
            counts[name] = tokens
    asyncio.run(engine.aclose())

    print(f"expert {args.expert}, {args.tokens} tokens, {args.rounds} rounds, greedy, one stream")
    print(f"schema compile: first {compile_ms[0]:.1f} ms, cached {compile_ms[1]:.3f} ms")
    print(f"mask alone: {mask_us:.0f} us/token over {len(ids)} tokens (vocabulary {vocab})")
    print("| decoding | ms/token (median) | runs | tokens |")
    print("|---|---|---|---|")
    for name, values in results.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} | {runs} | {counts[name]} |")
    added = statistics.median(results["constrained"]) - statistics.median(results["unconstrained"])
    print(f"added per token: {added:.2f} ms")


if __name__ == "__main__":
    main()
