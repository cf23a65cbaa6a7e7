"""Cost-aware routing: Avengers-Pro's score, alpha = 1 as today, measured rates, the curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from router import artifact
from router.cluster import ClusterRouter, trade_off
from router.costs import CostModel, measured_rates, one_unit
from router.curve import compute_curve, random_mixing
from tests.unit.test_cluster_router import EXPERTS, blobs


def test_the_score_on_hand_made_clusters() -> None:
    accuracy = np.array([0.8, 0.6, 0.2])
    cost = np.array([10.0, 2.0, 1.0])
    # alpha 0.5: quality (1, 2/3, 0) against cheapness (0, 0.8, 0.9).
    assert trade_off(accuracy, cost, 0.5) == pytest.approx([0.5, (2 / 3 + 0.8) / 2, 0.45])
    assert np.argmax(trade_off(accuracy, cost, 0.5)) == 1  # the middle expert wins
    assert np.argmax(trade_off(accuracy, cost, 0.0)) == 2  # cheapest
    assert trade_off(accuracy, cost, 1.0) is accuracy  # accuracy alone, untouched
    assert trade_off(np.array([0.5, 0.5]), np.array([4.0, 2.0]), 0.9)[1] > 0.9  # a tie: cost
    # Against a pool-wide highest cost of 100 the same savings are small: accuracy wins.
    pooled = trade_off(accuracy, cost, 0.5, highest=100.0)
    assert pooled == pytest.approx([0.95, (2 / 3 + 0.98) / 2, 0.495])
    # A near tie (0.26 against 0.25) is a whole quality point inside its cluster, but 2% of a
    # pool-wide spread of 0.5: at alpha 0.7 the expert three times cheaper then wins.
    tied, dearer = np.array([0.26, 0.25]), np.array([6.0, 2.0])
    assert np.argmax(trade_off(tied, dearer, 0.7)) == 0
    assert trade_off(tied, dearer, 0.7, span=0.5, highest=6.0) == pytest.approx([0.014, 0.2])


def test_a_pool_wide_cost_scale_gives_way_only_where_the_saving_is_large() -> None:
    X, scores, labels = blobs(30, seed=3)
    # One-token answers on clusters 0 and 1, long ones on cluster 2; the right expert costs
    # twice the others everywhere.
    costs = np.where(labels == 2, 100.0, 1.0)[:, None] * np.where(scores == 1, 2.0, 1.0)
    router = ClusterRouter(n_clusters=3, prior_strength=0).fit(X, scores, EXPERTS, costs)
    X_new, _, new_labels = blobs(10, seed=4)

    def right(scale: str) -> list[bool]:
        decisions = router.route(X_new, quality_weight=0.3, cost_scale=scale)  # type: ignore[arg-type]
        return [d.experts[0] == EXPERTS[y] for d, y in zip(decisions, new_labels, strict=True)]

    assert not any(right("cluster"))  # every cluster trades alike: the right expert loses
    assert right("pool") == [y != 2 for y in new_labels]
    with pytest.raises(ValueError, match="cost_scale must be one of"):
        router.route(X_new, quality_weight=0.3, cost_scale="global")  # type: ignore[arg-type]


def _fitted(with_costs: bool) -> ClusterRouter:
    X, scores, labels = blobs(30, seed=3)
    costs = np.where(labels[:, None] == 0, 5.0, 1.0) * np.array([1.0, 2.0, 4.0])
    return ClusterRouter(n_clusters=6).fit(X, scores, EXPERTS, costs if with_costs else None)


def test_alpha_one_reproduces_todays_rankings_and_weights_exactly() -> None:
    X_new, _, _ = blobs(20, seed=4)
    today = _fitted(with_costs=False).route(X_new, top_k=3)
    knob = _fitted(with_costs=True).route(X_new, top_k=3, quality_weight=1.0)
    assert [(d.experts, d.weights) for d in today] == [(d.experts, d.weights) for d in knob]
    assert all(len(d.expected_costs) == 3 for d in knob)


def test_lower_alpha_moves_queries_to_cheaper_experts() -> None:
    router = _fitted(with_costs=True)
    X_new, _, _ = blobs(20, seed=5)
    shares = []
    for alpha in (1.0, 0.1, 0.0):
        picks = [d.experts[0] for d in router.route(X_new, quality_weight=alpha)]
        shares.append(picks.count("geo") / len(picks))  # geo is the cheapest expert
    assert shares[0] < shares[1] <= shares[2] == 1.0
    with pytest.raises(ValueError, match="quality_weight must be in"):
        router.route(X_new, quality_weight=1.5)
    with pytest.raises(ValueError, match="fitted without costs"):
        _fitted(with_costs=False).route(X_new, quality_weight=0.5)


def test_costs_survive_the_artifact(tmp_path: Path) -> None:
    router = _fitted(with_costs=True)
    models = {e: CostModel("seconds", 0.01 * (i + 1), 0.1 * (i + 1)) for i, e in enumerate(EXPERTS)}
    artifact.save(tmp_path / "r", router, embedder="e", dim=16, stats={}, costs=models)
    loaded = artifact.load(tmp_path / "r")
    assert loaded.costs == models
    assert np.array_equal(loaded.router.cluster_costs_, router.cluster_costs_)
    X_new, _, _ = blobs(5, seed=6)
    assert router.route(X_new, quality_weight=0.3) == loaded.router.route(X_new, quality_weight=0.3)
    plain = _fitted(with_costs=False)
    artifact.save(tmp_path / "p", plain, embedder="e", dim=16, stats={})
    assert (
        artifact.load(tmp_path / "p").costs == {}
        and not artifact.load(tmp_path / "p").router.has_costs
    )


def test_measured_rates_recover_seconds_per_token() -> None:
    rng = np.random.default_rng(0)
    tokens = [(int(p), int(c)) for p, c in rng.integers(5, 300, size=(200, 2))]
    seconds = [0.002 * p + 0.05 * c + rng.normal(0, 0.01) for p, c in tokens]
    model = measured_rates(tokens, seconds)
    assert model.unit == "seconds"
    assert model.per_prompt_token == pytest.approx(0.002, rel=0.05)
    assert model.per_completion_token == pytest.approx(0.05, rel=0.01)
    assert CostModel.priced(1.0, 3.0, "USD").cost(1_000_000, 500_000) == pytest.approx(2.5)


def test_experts_in_different_units_are_refused() -> None:
    with pytest.raises(ValueError, match=r"different units.*a: USD, b: seconds"):
        one_unit({"a": CostModel("USD", 1, 1), "b": CostModel("seconds", 1, 1)}, "pools.p")


def test_random_mixing_is_the_upper_hull_of_the_experts() -> None:
    experts = {"cheap": (0.5, 1.0), "middle": (0.55, 5.0), "best": (0.9, 9.0)}
    assert random_mixing(experts, 1.0) == pytest.approx(0.5)
    assert random_mixing(experts, 5.0) == pytest.approx(0.7)  # above "middle": on the hull
    assert random_mixing(experts, 20.0) == pytest.approx(0.9)


def test_the_curve_finds_the_cheap_target_when_routing_knows_where_experts_are_good() -> None:
    X, scores, labels = blobs(40, seed=7)
    # geo is right on its cluster only and cheap; math is right on two clusters but dear.
    scores = scores.copy()
    scores[labels == 2, 1] = 1.0
    costs = np.tile([1.0, 10.0, 10.0], (len(X), 1))
    router = ClusterRouter(n_clusters=6).fit(X, scores, EXPERTS, costs)
    X_test, scores_test, labels_test = blobs(30, seed=8)
    scores_test = scores_test.copy()
    scores_test[labels_test == 2, 1] = 1.0
    costs_test = np.tile([1.0, 10.0, 10.0], (len(X_test), 1))
    curve = compute_curve(
        router, X_test, scores_test, costs_test, grid=np.linspace(0, 1, 11).tolist(), target=0.95
    )
    assert curve.best_expert in {"math", "words"}
    assert curve.above_random and curve.mean_gain > 0
    assert (
        curve.target is not None
        and curve.target.accuracy >= 0.95 * curve.experts[curve.best_expert][0]
    )
    assert curve.target_ratio is not None and curve.target_ratio < 1
    assert any(p.pareto for p in curve.points)
