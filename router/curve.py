"""The quality-for-cost curve of a cost-aware router, on held-out records (no model calls).

For each `quality_weight` alpha on a grid, every record is routed to its top expert; the
record's score and cost for that expert are what the router would have bought. The curve is
compared with every single expert and with random mixing of experts: sending a random share of
queries to each expert gives any point on a line between two experts, so the best random mix at
a cost is the upper hull of the experts' points. RouteLLM reports APGR against its random
router; here `mean_gain` is the mean accuracy above random mixing over the cost range, and
`apgr` the mean performance gap recovered between the cheapest and the most accurate expert.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from router.cluster import ClusterRouter, CostScale, Float32Array, FloatArray


@dataclass(frozen=True, slots=True)
class CurvePoint:
    quality_weight: float
    accuracy: float
    cost: float
    share: dict[str, float]  # of queries routed to each expert
    pareto: bool = False  # not beaten on both accuracy and cost by another point or expert


@dataclass(frozen=True, slots=True)
class Curve:
    experts: dict[str, tuple[float, float]]  # each single expert's (accuracy, cost)
    points: list[CurvePoint]
    mean_gain: float  # mean accuracy above random mixing, over the experts' cost range
    apgr: float
    above_random: bool  # every point at or above random mixing at its cost
    target: CurvePoint | None = None
    target_ratio: float | None = None
    notes: list[str] = field(default_factory=list)
    cost_scale: CostScale = "cluster"

    @property
    def best_expert(self) -> str:
        return max(self.experts, key=lambda e: (self.experts[e][0], -self.experts[e][1]))


def random_mixing(experts: dict[str, tuple[float, float]], cost: float) -> float:
    """The best accuracy random mixing of the experts reaches at `cost`: the upper hull of their
    (cost, accuracy) points, flat beyond its ends."""
    pts = sorted((c, a) for a, c in experts.values())
    hull: list[tuple[float, float]] = []
    for p in pts:  # monotone chain, upper side
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    best = max(a for _, a in pts)
    if cost <= hull[0][0]:
        return hull[0][1]
    for (c0, a0), (c1, a1) in itertools.pairwise(hull):
        if c0 <= cost <= c1:
            return a0 + (a1 - a0) * (cost - c0) / (c1 - c0) if c1 > c0 else max(a0, a1)
    return best


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _frontier(points: Sequence[tuple[float, float]], grid: FloatArray) -> FloatArray:
    """Best accuracy reachable at each cost of `grid` by the points (a step function: a point
    costing at most c is affordable at c)."""
    ordered = sorted(points)
    out = np.full(len(grid), -np.inf)
    for i, c in enumerate(grid):
        affordable = [a for cost, a in ordered if cost <= c + 1e-12]
        out[i] = max(affordable) if affordable else -np.inf
    return out


def compute_curve(
    router: ClusterRouter,
    X: Float32Array,
    scores: FloatArray,
    costs: FloatArray,
    *,
    grid: Sequence[float],
    clusters_considered: int = 3,
    beta: float = 10.0,
    cost_scale: CostScale = "cluster",
    target: float | None = None,
) -> Curve:
    names = list(router.experts_)
    picks = np.array(
        [
            [
                names.index(d.experts[0])
                for d in router.route(
                    X,
                    top_k=1,
                    clusters_considered=clusters_considered,
                    beta=beta,
                    quality_weight=float(alpha),
                    cost_scale=cost_scale,
                )
            ]
            for alpha in grid
        ]
    )
    return curve_from_picks(
        picks, scores, costs, names, grid=grid, cost_scale=cost_scale, target=target
    )


def curve_from_picks(
    picks: npt.NDArray[np.int_],
    scores: FloatArray,
    costs: FloatArray,
    names: Sequence[str],
    *,
    grid: Sequence[float],
    cost_scale: CostScale = "cluster",
    target: float | None = None,
) -> Curve:
    """The curve of routing decisions already made: `picks[i, r]` is the expert (a column of
    `scores` and `costs`) that record r went to at `grid[i]`."""
    experts = {
        n: (float(scores[:, j].mean()), float(costs[:, j].mean())) for j, n in enumerate(names)
    }
    rows = np.arange(len(scores))
    points = []
    for alpha, row_picks in zip(grid, picks, strict=True):
        share = {n: float(np.mean(row_picks == j)) for j, n in enumerate(names)}
        points.append(
            CurvePoint(
                float(alpha),
                float(scores[rows, row_picks].mean()),
                float(costs[rows, row_picks].mean()),
                share,
            )
        )
    everything = [(p.cost, p.accuracy) for p in points] + [(c, a) for a, c in experts.values()]
    points = [
        CurvePoint(
            p.quality_weight,
            p.accuracy,
            p.cost,
            p.share,
            pareto=not any(
                c <= p.cost and a >= p.accuracy and (c < p.cost or a > p.accuracy)
                for c, a in everything
            ),
        )
        for p in points
    ]
    above = all(p.accuracy >= random_mixing(experts, p.cost) - 1e-12 for p in points)
    best = max(experts.values(), key=lambda v: (v[0], -v[1]))
    cheapest = min(experts.values(), key=lambda v: (v[1], -v[0]))
    low, high = cheapest[1], max(best[1], cheapest[1])
    cost_grid = np.linspace(low, high, 201) if high > low else np.array([low])
    routed = _frontier([(p.cost, p.accuracy) for p in points], cost_grid)
    mixed = np.array([random_mixing(experts, c) for c in cost_grid])
    routed = np.where(np.isfinite(routed), routed, mixed)  # nothing routed that cheap
    mean_gain = float(np.mean(routed - mixed))
    gap = best[0] - cheapest[0]
    apgr = float(np.mean((routed - cheapest[0]) / gap)) if gap > 0 else float("nan")
    curve = Curve(experts, points, mean_gain, apgr, above, cost_scale=cost_scale)
    if target is not None:
        wanted = target * best[0]
        hits = [p for p in points if p.accuracy >= wanted - 1e-12]
        if hits:
            chosen = min(hits, key=lambda p: (p.cost, -p.accuracy))
            ratio = chosen.cost / best[1] if best[1] > 0 else None
            return replace(curve, target=chosen, target_ratio=ratio)
        curve.notes.append(f"no alpha on the grid keeps {target:.0%} of the best expert")
    return curve
