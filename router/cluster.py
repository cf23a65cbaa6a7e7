"""The Avengers router on embeddings: K-Means clusters, per-cluster expert scores, soft top-K.

scikit-learn conventions: `__init__` stores parameters only, `fit` sets the `*_` attributes and
returns self, and routing before fitting raises `NotFittedError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Self

import numpy as np
import numpy.typing as npt

from router.decision import RouteDecision

Float32Array = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]

MIN_QUERIES_PER_CLUSTER = 8

CostScale = Literal["cluster", "pool"]
COST_SCALES: tuple[CostScale, ...] = ("cluster", "pool")


class NotFittedError(RuntimeError):
    pass


def cap_clusters(requested: int, n_samples: int) -> int:
    """No more clusters than leave about `MIN_QUERIES_PER_CLUSTER` queries in each."""
    return max(1, min(requested, n_samples // MIN_QUERIES_PER_CLUSTER))


def _unit(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: FloatArray = x / np.maximum(norms, 1e-12)
    return out


class ClusterRouter:
    """Routes a query to the experts that scored best on calibration queries near it.

    Parameters
    ----------
    n_clusters : requested K; `fit` caps it by the data size (see `cap_clusters`).
    prior_strength : pseudo-count pulling a small cluster's scores toward the global mean.
    ood_quantile, ood_margin : a query farther from every centroid than `ood_margin` times this
        quantile of the calibration queries' nearest-centroid distances is out of distribution.
        The margin is wide because calibration queries sit closer to centroids fitted on them
        than new queries do: with MiniLM, unseen in-topic questions came to 1.1x the calibration
        maximum, gibberish and other topics to over 2x.
    """

    def __init__(
        self,
        n_clusters: int = 64,
        *,
        random_state: int = 0,
        prior_strength: float = 2.0,
        ood_quantile: float = 0.99,
        ood_margin: float = 1.5,
    ) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.prior_strength = prior_strength
        self.ood_quantile = ood_quantile
        self.ood_margin = ood_margin

    def fit(
        self,
        X: Float32Array,
        scores: FloatArray,
        experts: Sequence[str],
        costs: FloatArray | None = None,
    ) -> Self:
        """X: (n_samples, dim) embeddings; scores: (n_samples, n_experts) in [0, 1]; costs, when
        known: (n_samples, n_experts), what each expert's answer cost."""
        from sklearn.cluster import KMeans  # scikit-learn is heavy; only fitting needs it

        X64 = _unit(np.asarray(X, dtype=np.float64))
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(X64), len(experts)):
            raise ValueError(f"scores must be (n_samples, n_experts), got {scores.shape}")
        k = cap_clusters(self.n_clusters, len(X64))
        kmeans = KMeans(n_clusters=k, n_init="auto", random_state=self.random_state).fit(X64)
        labels = kmeans.labels_
        self.experts_ = list(experts)
        self.centroids_ = _unit(kmeans.cluster_centers_).astype(np.float32)
        self.cluster_counts_ = np.bincount(labels, minlength=k).astype(np.int64)
        self.global_scores_ = scores.mean(axis=0)
        self.cluster_scores_ = self._shrunk(labels, scores, self.global_scores_)
        if costs is not None:
            costs = np.asarray(costs, dtype=np.float64)
            if costs.shape != scores.shape:
                raise ValueError(f"costs must be shaped like scores, got {costs.shape}")
            self.global_costs_ = costs.mean(axis=0)
            self.cluster_costs_ = self._shrunk(labels, costs, self.global_costs_)
        nearest = 1.0 - np.max(X64 @ self.centroids_.T.astype(np.float64), axis=1)
        self.ood_threshold_ = float(np.quantile(nearest, self.ood_quantile) * self.ood_margin)
        self.calibration_distance_ = {
            "mean": float(nearest.mean()),
            "p50": float(np.quantile(nearest, 0.5)),
            "max": float(nearest.max()),
        }
        return self

    def _shrunk(
        self, labels: npt.NDArray[np.int64], values: FloatArray, prior_mean: FloatArray
    ) -> FloatArray:
        """Per-cluster means, pulled toward the global mean by `prior_strength` pseudo-counts."""
        sums = np.zeros((len(self.cluster_counts_), values.shape[1]))
        np.add.at(sums, labels, values)
        prior = self.prior_strength
        out: FloatArray = (sums + prior * prior_mean) / (self.cluster_counts_[:, None] + prior)
        return out

    @property
    def has_costs(self) -> bool:
        return hasattr(self, "cluster_costs_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "centroids_"):
            raise NotFittedError("this ClusterRouter is not fitted yet; call fit() first")

    def route(
        self,
        X: Float32Array,
        *,
        top_k: int = 1,
        clusters_considered: int = 3,
        beta: float = 10.0,
        quality_weight: float = 1.0,
        cost_scale: CostScale = "cluster",
    ) -> list[RouteDecision]:
        """Rank the experts for each query in X (n_queries, dim), best first, keeping `top_k`.

        Soft assignment over the `clusters_considered` nearest clusters, P(c|q) =
        softmax(-beta * d_c) with d_c = 1 - cos(q, centroid_c); expected accuracy A(m) = sum_c
        P(c|q) * score_c(m), and likewise expected cost C(m). A query farther than the OOD
        threshold from every centroid uses the global means instead and is flagged.

        The ranking is by A(m) alone when `quality_weight` is 1; below 1 it is Avengers-Pro's
        score alpha * (A(m) - min A) / (max A - min A) + (1 - alpha) * (1 - C(m) / max C), over
        this query's soft mixture of clusters (a query inside one cluster gets exactly the
        per-cluster formula). With `cost_scale` "pool", max A - min A is instead the spread of
        accuracies over every cluster and max C the highest cost of any expert in any cluster,
        so a gain and a saving count by their size: where the experts are nearly tied a small
        saving wins, where one expert is far ahead only a large one does. `weights` are the
        top-K accuracies normalised to sum to 1.
        """
        self._check_fitted()
        if not 0 <= quality_weight <= 1:
            raise ValueError(f"quality_weight must be in [0, 1], got {quality_weight}")
        if quality_weight < 1 and not self.has_costs:
            raise ValueError("this router was fitted without costs; quality_weight must be 1")
        if cost_scale not in COST_SCALES:
            raise ValueError(f"cost_scale must be one of {COST_SCALES}, got {cost_scale!r}")
        span = highest = None  # "cluster": each query's own experts
        if cost_scale == "pool" and self.has_costs:
            span = float(self.cluster_scores_.max() - self.cluster_scores_.min())
            highest = float(self.cluster_costs_.max())
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        distances = 1.0 - X @ self.centroids_.T
        m = min(clusters_considered, len(self.centroids_))
        near = np.argsort(distances, axis=1)[:, :m]
        decisions = []
        for row, clusters in zip(distances, near, strict=True):
            d = row[clusters].astype(np.float64)
            ood = bool(d[0] > self.ood_threshold_)
            p = np.exp(-beta * (d - d[0]))
            p /= p.sum()
            accuracy = self.global_scores_ if ood else p @ self.cluster_scores_[clusters]
            cost = None
            if self.has_costs:
                cost = self.global_costs_ if ood else p @ self.cluster_costs_[clusters]
            ranking = (
                accuracy
                if cost is None
                else trade_off(accuracy, cost, quality_weight, span=span, highest=highest)
            )
            order = np.argsort(-ranking, kind="stable")[:top_k]
            top = accuracy[order]
            weights = top / top.sum() if top.sum() > 0 else np.full(len(top), 1 / len(top))
            decisions.append(
                RouteDecision(
                    experts=tuple(self.experts_[i] for i in order),
                    weights=tuple(float(w) for w in weights),
                    cluster=int(clusters[0]),
                    distance=float(d[0]),
                    ood=ood,
                    expected_costs=() if cost is None else tuple(float(cost[i]) for i in order),
                )
            )
        return decisions


def trade_off(
    accuracy: FloatArray,
    cost: FloatArray,
    quality_weight: float,
    *,
    span: float | None = None,
    highest: float | None = None,
) -> FloatArray:
    """Avengers-Pro's score of each expert: accuracy above the lowest, over `span`, against
    cheapness, `1 - cost / highest` (by default the spread and the highest of these experts').

    With `quality_weight` 1 the result ranks exactly as `accuracy` does."""
    if quality_weight >= 1:
        return accuracy
    span = float(accuracy.max() - accuracy.min()) if span is None else span
    quality = (accuracy - accuracy.min()) / span if span > 0 else np.ones_like(accuracy)
    highest = float(cost.max()) if highest is None else highest
    cheapness = 1 - cost / highest if highest > 0 else np.ones_like(cost)
    out: FloatArray = quality_weight * quality + (1 - quality_weight) * cheapness
    return out
