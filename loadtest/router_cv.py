"""Choosing a router's clusters and cost scale on calibration records alone, by cross-validation.

    .venv/bin/python loadtest/router_cv.py [--data configs/data/public/calibration-auto.jsonl]
        [--clusters 4,8,12,16,24] [--folds 5] [--repeats 2]

For each number of clusters K and each `cost_scale`, every record is routed by a router fitted
on the other folds, at every `quality_weight` on a grid (no model calls: the records hold each
expert's score and cost). Printed per (K, scale): accuracy at alpha 1, the cheapest alpha that
keeps 95% of the best single expert's accuracy (as `chorus router curve --target 0.95`), the
alphas more accurate and cheaper than that expert, and the mean accuracy above random mixing.
The test split is never read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from loadtest import ROOT
from router.calibration import embed_all, load_calibration
from router.cluster import COST_SCALES, ClusterRouter, CostScale, Float32Array, FloatArray
from router.curve import random_mixing
from serving.config import load_config
from serving.models.embedders import load_embedder

GRID = np.linspace(0, 1, 21)


def out_of_fold_picks(
    X: Float32Array,
    scores: FloatArray,
    costs: FloatArray,
    experts: list[str],
    *,
    clusters: int,
    scale: CostScale,
    folds: int,
    seed: int,
) -> np.ndarray:
    """(len(GRID), n): the expert each record is routed to at each alpha, by a router that did
    not see it."""
    n = len(X)
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    picks = np.zeros((len(GRID), n), dtype=int)
    for f, held in enumerate(parts):
        fit = np.concatenate([p for g, p in enumerate(parts) if g != f])
        router = ClusterRouter(clusters, random_state=0).fit(
            X[fit], scores[fit], experts, costs[fit]
        )
        for i, alpha in enumerate(GRID):
            decisions = router.route(X[held], quality_weight=float(alpha), cost_scale=scale)
            picks[i, held] = [experts.index(d.experts[0]) for d in decisions]
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--pool", default="auto")
    default_data = ROOT / "configs" / "data" / "public" / "calibration-auto.jsonl"
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--clusters", default="4,8,12,16,24")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    config = load_config(args.config, check_artifacts=False)
    experts = list(config.pools[args.pool].experts)
    data = load_calibration(args.data, experts)
    costs = data.costs(data.cost_models({}))
    X = embed_all(load_embedder(config.router.embedder, config.router.backend), data.queries)
    rows = np.arange(len(X))
    singles = {
        e: (float(data.scores[:, j].mean()), float(costs[:, j].mean()))
        for j, e in enumerate(experts)
    }
    best_accuracy, best_cost = max(singles.values())
    print(f"{len(X)} records; each expert's (accuracy, cost per query):")
    for name, (single_accuracy, single_cost) in singles.items():
        print(f"  {name}: {single_accuracy:.3f}, {single_cost:.3f}")
    print("K  scale    alpha-1  target: alpha acc/best cost/best  gain  cheaper-and-better alphas")
    for k in (int(k) for k in args.clusters.split(",")):
        for scale in COST_SCALES:
            accuracy = np.zeros(len(GRID))
            cost = np.zeros(len(GRID))
            for repeat in range(args.repeats):
                picks = out_of_fold_picks(
                    X, data.scores, costs, experts,
                    clusters=k, scale=scale, folds=args.folds, seed=100 + repeat,
                )  # fmt: skip
                accuracy += data.scores[rows, picks].mean(axis=1) / args.repeats
                cost += costs[rows, picks].mean(axis=1) / args.repeats
            mixing = [random_mixing(singles, float(c)) for c in cost]
            gain = float(np.mean(accuracy - np.array(mixing)))
            keeps = [i for i in range(len(GRID)) if accuracy[i] >= 0.95 * best_accuracy - 1e-12]
            better = [
                f"{GRID[i]:.2f}"
                for i in range(len(GRID))
                if accuracy[i] > best_accuracy and cost[i] < best_cost
            ]
            target = "none on the grid"
            if keeps:
                t = min(keeps, key=lambda i: (cost[i], -accuracy[i]))
                target = (
                    f"{GRID[t]:.2f}  {accuracy[t] / best_accuracy:6.1%}  {cost[t] / best_cost:6.1%}"
                )
            print(
                f"{k:<2} {scale:8} {accuracy[-1]:.3f}    {target}  {gain:+.4f}  "
                f"{' '.join(better) or '-'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
