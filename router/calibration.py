"""Fitting a router from calibration records, with a held-out check of what it buys.

A calibration record is one JSON line: `{"query": str, "scores": {expert: float in [0, 1]}}`
(the score is how well that expert answered the query; 1/0 for graded short answers), and, as
`chorus calibrate` writes them, what each answer cost: `"tokens": {expert: {"prompt": int,
"completion": int}}` and `"seconds": {expert: float}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from router.cluster import ClusterRouter
from router.costs import CostModel, measured_rates, one_unit
from router.embedder import Embedder, Float32Array
from router.files import read_jsonl


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    queries: list[str]
    scores: np.ndarray  # (n_queries, n_experts), columns in `experts` order
    experts: list[str]
    tokens: np.ndarray | None = None  # (n_queries, n_experts, 2): prompt, completion
    seconds: np.ndarray | None = None  # (n_queries, n_experts)
    categories: list[str] | None = None

    def cost_models(self, prices: Mapping[str, CostModel]) -> dict[str, CostModel]:
        """Each expert's cost model: its price, else the seconds per token measured here."""
        models = {}
        for j, name in enumerate(self.experts):
            if name in prices:
                models[name] = prices[name]
            elif self.tokens is None or self.seconds is None:
                raise ValueError(
                    f"expert {name!r} has no price and the records do not say what its answers "
                    "took (tokens and seconds); recalibrate with `chorus calibrate`"
                )
            else:
                pairs = [(int(p), int(c)) for p, c in self.tokens[:, j]]
                models[name] = measured_rates(pairs, self.seconds[:, j].tolist())
        one_unit(models, "the pool")
        return models

    def costs(self, models: Mapping[str, CostModel]) -> np.ndarray:
        """(n_queries, n_experts): what each answer cost under `models`."""
        if self.tokens is None:
            raise ValueError("the records carry no token counts to reckon costs from")
        rates = np.array(
            [[models[e].per_prompt_token, models[e].per_completion_token] for e in self.experts]
        )
        out: np.ndarray = (self.tokens * rates[None, :, :]).sum(axis=2)
        return out


def load_calibration(path: Path, experts: Sequence[str]) -> CalibrationSet:
    """Read and check records: every one must score exactly the pool's experts, in [0, 1]."""
    queries: list[str] = []
    rows: list[list[float]] = []
    tokens: list[list[list[int]]] | None = []
    seconds: list[list[float]] | None = []
    categories: list[str] = []
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
        categories.append(str(record.get("category", "all")))
        spent, took = record.get("tokens"), record.get("seconds")
        if tokens is not None and isinstance(spent, dict) and set(spent) >= wanted:
            tokens.append([[int(spent[e]["prompt"]), int(spent[e]["completion"])] for e in experts])
        else:
            tokens = None  # costs are known only when every record says what it took
        if seconds is not None and isinstance(took, dict) and set(took) >= wanted:
            seconds.append([float(took[e]) for e in experts])
        else:
            seconds = None
    if not queries:
        raise ValueError(f"{path}: no calibration records")
    return CalibrationSet(
        queries,
        np.array(rows),
        list(experts),
        None if tokens is None else np.array(tokens, dtype=np.float64),
        None if seconds is None else np.array(seconds, dtype=np.float64),
        categories,
    )


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
    cost_models: Mapping[str, CostModel] | None = None,
) -> tuple[ClusterRouter, dict[str, Any]]:
    """Embed, report on a held-out split, then fit the final router on every record (with each
    cluster's mean cost per expert too, given `cost_models`)."""
    X = embed_all(embedder, data.queries)
    report = holdout_report(X, data, n_clusters=n_clusters, holdout=holdout, seed=seed)
    costs = None if cost_models is None else data.costs(cost_models)
    router = ClusterRouter(n_clusters, random_state=seed).fit(X, data.scores, data.experts, costs)
    stats = {"queries": len(data.queries), "holdout": report}
    return router, stats
