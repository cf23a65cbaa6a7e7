"""Choosing a router's clusters and cost scale on calibration records alone, by cross-validation.

    .venv/bin/python loadtest/router_cv.py [--data configs/data/public/calibration-auto.jsonl]
        [--clusters 4,8,12,16,24] [--folds 5] [--repeats 2]

For each number of clusters K and each `cost_scale`, every record is routed by a router fitted
on the other folds, at every `quality_weight` on a grid (no model calls: the records hold each
expert's score and cost). Printed per (K, scale): accuracy at alpha 1, the cheapest alpha that
keeps 95% of the best single expert's accuracy (as `chorus router curve --target 0.95`), the
alphas more accurate and cheaper than that expert, and the mean gain over random mixing (all
as `chorus router curve` reckons them, `router/curve.py`).
The test split is never read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from loadtest import ROOT
from router.calibration import embed_all, load_calibration
from router.cluster import COST_SCALES, ClusterRouter, CostScale, Float32Array, FloatArray
from router.curve import curve_from_picks
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
    # The repeats stacked as one set of records: each alpha's mean is the mean over repeats.
    stacked_scores = np.tile(data.scores, (args.repeats, 1))
    stacked_costs = np.tile(costs, (args.repeats, 1))
    print(f"{len(X)} records; each expert's (accuracy, cost per query):")
    for j, name in enumerate(experts):
        print(f"  {name}: {data.scores[:, j].mean():.3f}, {costs[:, j].mean():.3f}")
    print("K  scale    alpha-1  target: alpha acc/best cost/best  gain  cheaper-and-better alphas")
    for k in (int(k) for k in args.clusters.split(",")):
        for scale in COST_SCALES:
            picks = np.concatenate(
                [
                    out_of_fold_picks(
                        X,
                        data.scores,
                        costs,
                        experts,
                        clusters=k,
                        scale=scale,
                        folds=args.folds,
                        seed=100 + repeat,
                    )
                    for repeat in range(args.repeats)
                ],
                axis=1,
            )
            curve = curve_from_picks(
                picks,
                stacked_scores,
                stacked_costs,
                experts,
                grid=GRID.tolist(),
                cost_scale=scale,
                target=0.95,
            )
            best_accuracy, best_cost = curve.experts[curve.best_expert]
            better = [
                f"{p.quality_weight:.2f}"
                for p in curve.points
                if p.accuracy > best_accuracy and p.cost < best_cost
            ]
            target = "none on the grid"
            if curve.target is not None and curve.target_ratio is not None:
                t = curve.target
                target = (
                    f"{t.quality_weight:.2f}  {t.accuracy / best_accuracy:6.1%}  "
                    f"{curve.target_ratio:6.1%}"
                )
            print(
                f"{k:<2} {scale:8} {curve.points[-1].accuracy:.3f}    {target}  "
                f"{curve.mean_gain:+.4f}  {' '.join(better) or '-'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
