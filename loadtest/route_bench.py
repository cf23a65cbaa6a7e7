"""Routing cost against the bare embedding it is built on, measured side by side in one run.

    .venv/bin/python loadtest/route_bench.py [--config configs/default.yaml --pool auto]

1. bare embedding, one query at a time (`SentenceTransformer.encode([q])`): p50/p99
2. routing one query at a time through the serving path (micro-batcher + cluster router): p50/p99
3. bare embedding in batches of 256: the per-query floor, as queries/s
4. routing under 64 concurrent queries: routes/s, and how many queries shared each encode call
Phases 1 and 2 alternate query by query, so machine noise hits both alike.
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


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


async def run(
    config_path: Path, pool: str, n: int, concurrent_total: int, wait_ms: float | None = None
) -> dict[str, object]:
    config = load_config(config_path)
    settings = config.pools[pool].router
    assert settings is not None, f"pool {pool} has no router"
    embedder = load_embedder(config.router.embedder, config.router.backend)
    batcher = BatchingEmbedder(
        embedder, wait_ms=wait_ms if wait_ms is not None else config.router.batch_wait_ms
    )
    router = SemanticRouter(
        artifact.load(Path(settings.artifact)),
        batcher,
        top_k=settings.top_k,
        clusters_considered=settings.clusters_considered,
        beta=settings.beta,
    )
    questions = [
        json.loads(line)["question"]
        for line in (ROOT / "configs" / "data" / "test.jsonl").read_text().splitlines()
    ]
    for q in questions[:20]:  # warm-up
        embedder.encode([q])
        await router.route([ChatMessage("user", q)])

    bare, routed = [], []
    for i in range(n):
        q = questions[i % len(questions)]
        started = time.perf_counter()
        embedder.encode([q])
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        await router.route([ChatMessage("user", q)])
        routed.append(time.perf_counter() - started)

    batch = [questions[i % len(questions)] for i in range(256)]
    started = time.perf_counter()
    embedder.encode(batch)
    floor_qps = 256 / (time.perf_counter() - started)

    queue = [questions[i % len(questions)] for i in range(concurrent_total)]
    batches_before = batcher.batches

    async def worker() -> None:
        while queue:
            await router.route([ChatMessage("user", queue.pop())])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(64)))
    elapsed = time.perf_counter() - started
    encodes = batcher.batches - batches_before
    await batcher.aclose()
    return {
        "bare_embed_p50_ms": round(pct(bare, 50), 2),
        "bare_embed_p99_ms": round(pct(bare, 99), 2),
        "route_p50_ms": round(pct(routed, 50), 2),
        "route_p99_ms": round(pct(routed, 99), 2),
        "route_over_embed_p50": round(statistics.median(routed) / statistics.median(bare), 3),
        "bare_embed_batch256_queries_per_s": round(floor_qps, 1),
        "routes_per_s_at_64_concurrent": round(concurrent_total / elapsed, 1),
        "mean_queries_per_encode": round(concurrent_total / max(encodes, 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--pool", default="auto")
    parser.add_argument("--queries", type=int, default=300, help="sequential queries per phase")
    parser.add_argument("--concurrent-total", type=int, default=4096)
    parser.add_argument("--wait-ms", type=float, help="override the config's batch_wait_ms")
    args = parser.parse_args()
    result = asyncio.run(
        run(args.config, args.pool, args.queries, args.concurrent_total, args.wait_ms)
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
