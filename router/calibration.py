"""Fitting a router from calibration records, with a held-out check of what it buys.

A calibration record is one JSON line: `{"query": str, "scores": {expert: float in [0, 1]}}`
(the score is how well that expert answered the query; 1/0 for graded short answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from router.cluster import ClusterRouter
from router.embedder import Embedder, Float32Array
from router.files import read_jsonl


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    queries: list[str]
    scores: np.ndarray  # (n_queries, n_experts), columns in `experts` order
    experts: list[str]


def load_calibration(path: Path, experts: Sequence[str]) -> CalibrationSet:
    """Read and check records: every one must score exactly the pool's experts, in [0, 1]."""
    queries: list[str] = []
    rows: list[list[float]] = []
    wanted = set(experts)
    for number, record in read_jsonl(path):
        query, scores = record.get("query"), record.get("scores")
        if not isinstance(query, str) or not isinstance(scores, dict):
            raise ValueError(f"{path}:{number}: needs a string `query` and a `scores` object")
        if set(scores) != wanted:
            raise ValueError(
                f"{path}:{number}: scores name {sorted(scores)}, the pool has {sorted(wanted)}"
            )
        row = [scores[e] for e in experts]
        if not all(isinstance(s, int | float) and 0 <= s <= 1 for s in row):
            raise ValueError(f"{path}:{number}: scores must be numbers in [0, 1]")
        queries.append(query)
        rows.append([float(s) for s in row])
    if not queries:
        raise ValueError(f"{path}: no calibration records")
    return CalibrationSet(queries, np.array(rows), list(experts))


def embed_all(embedder: Embedder, texts: list[str], batch: int = 64) -> Float32Array:
    parts = []
    with tqdm(total=len(texts), desc="embedding queries", unit="query") as bar:
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            parts.append(embedder.encode(chunk))
            bar.update(len(chunk))
    return np.concatenate(parts).astype(np.float32)


def holdout_report(
    X: Float32Array, data: CalibrationSet, *, n_clusters: int, holdout: float, seed: int
) -> dict[str, Any]:
    """Fit on a split, then compare on the rest: the router's top expert against always taking
    the expert that is best overall on the fitted part (and against the per-query oracle)."""
    n = len(data.queries)
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * holdout)) if n > 1 else 0
    test, train = order[:n_test], order[n_test:]
    if len(train) == 0 or len(test) == 0:
        return {"holdout_queries": 0}
    router = ClusterRouter(n_clusters, random_state=seed).fit(
        X[train], data.scores[train], data.experts
    )
    picks = [data.experts.index(d.experts[0]) for d in router.route(X[test], top_k=1)]
    best_overall = int(np.argmax(data.scores[train].mean(axis=0)))
    test_scores = data.scores[test]
    best_here = test_scores.max(axis=1)
    routed = test_scores[np.arange(len(test)), picks]
    fixed = test_scores[:, best_overall]
    return {
        "holdout_queries": len(test),
        "router_top1_is_best": round(float(np.mean(routed >= best_here)), 4),
        "global_best_is_best": round(float(np.mean(fixed >= best_here)), 4),
        "global_best_expert": data.experts[best_overall],
        "router_mean_score": round(float(routed.mean()), 4),
        "global_best_mean_score": round(float(fixed.mean()), 4),
        "oracle_mean_score": round(float(best_here.mean()), 4),
    }


def fit_router(
    data: CalibrationSet,
    embedder: Embedder,
    *,
    n_clusters: int = 64,
    holdout: float = 0.2,
    seed: int = 0,
) -> tuple[ClusterRouter, dict[str, Any]]:
    """Embed, report on a held-out split, then fit the final router on every record."""
    X = embed_all(embedder, data.queries)
    report = holdout_report(X, data, n_clusters=n_clusters, holdout=holdout, seed=seed)
    router = ClusterRouter(n_clusters, random_state=seed).fit(X, data.scores, data.experts)
    stats = {"queries": len(data.queries), "holdout": report}
    return router, stats
