"""What the quality-for-cost knob costs routing, measured side by side in one run.

    .venv/bin/python loadtest/knob_bench.py [--config configs/default.yaml --pool auto]

Routes the same queries through the serving path (micro-batcher + cluster router) at
`quality_weight` 1 (today's ranking) and at 0.5 (Avengers-Pro's score on the pool's
`cost_scale`), alternating query by query so machine noise hits both alike, and reports each
one's p50/p99 and their ratio. The bare cluster router on precomputed vectors is timed the
same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ensemble.types import ChatMessage
from loadtest import ROOT
from router import artifact
from router.embedder import BatchingEmbedder
from router.semantic import SemanticRouter
from serving.config import load_config
from serving.models.embedders import load_embedder

ALPHAS = (1.0, 0.5)


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values) * 1000, q)), 3)


async def run(config_path: Path, pool: str, n: int) -> dict[str, object]:
    config = load_config(config_path)
    settings = config.pools[pool].router
    assert settings is not None, f"pool {pool} has no router"
    fitted = artifact.load(Path(settings.artifact))
    assert fitted.router.has_costs, "the pool's router was fitted without costs"
    embedder = load_embedder(config.router.embedder, config.router.backend)
    batcher = BatchingEmbedder(embedder, wait_ms=config.router.batch_wait_ms)
    router = SemanticRouter(fitted, batcher, top_k=settings.top_k, cost_scale=settings.cost_scale)
    questions = [
        json.loads(line)["question"]
        for line in (ROOT / "configs" / "data" / "public" / "test.jsonl").read_text().splitlines()
    ]
    vectors = embedder.encode(questions[:n])
    for q in questions[:20]:  # warm-up
        await router.route([ChatMessage("user", q)])

    served: dict[float, list[float]] = {a: [] for a in ALPHAS}
    bare: dict[float, list[float]] = {a: [] for a in ALPHAS}
    for i in range(n):
        q = questions[i % len(questions)]
        for alpha in ALPHAS if i % 2 == 0 else ALPHAS[::-1]:
            started = time.perf_counter()
            await router.route([ChatMessage("user", q)], alpha)
            served[alpha].append(time.perf_counter() - started)
            started = time.perf_counter()
            fitted.router.route(
                vectors[i % len(vectors)][None, :],
                top_k=2,
                quality_weight=alpha,
                cost_scale=settings.cost_scale,
            )
            bare[alpha].append(time.perf_counter() - started)
    await batcher.aclose()
    out: dict[str, object] = {"queries": n}
    for name, timings in (("route", served), ("cluster_router", bare)):
        for alpha in ALPHAS:
            out[f"{name}_alpha_{alpha:g}_p50_ms"] = _ms(timings[alpha], 50)
            out[f"{name}_alpha_{alpha:g}_p99_ms"] = _ms(timings[alpha], 99)
        out[f"{name}_p50_ratio_knob_over_today"] = round(
            statistics.median(timings[0.5]) / statistics.median(timings[1.0]), 3
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--pool", default="auto")
    parser.add_argument("--queries", type=int, default=400)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.config, args.pool, args.queries)), indent=2))


if __name__ == "__main__":
    main()
