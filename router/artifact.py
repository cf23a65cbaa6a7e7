"""A fitted router on disk: `arrays.npz` plus `manifest.json`, written atomically.

The manifest says what the arrays mean (experts, embedder, parameters) so a loader can refuse an
artifact that does not match the pool or the embedder it is about to serve with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.cluster import ClusterRouter
from router.costs import CostModel
from router.files import replace_folder

FORMAT_VERSION = 1
_ARRAYS = ("centroids_", "cluster_scores_", "cluster_counts_", "global_scores_")
_COST_ARRAYS = ("cluster_costs_", "global_costs_")  # only in artifacts fitted with costs


class ArtifactError(ValueError):
    """An artifact that cannot be read, or does not fit what it is loaded for."""


@dataclass(frozen=True, slots=True)
class RouterArtifact:
    router: ClusterRouter
    embedder: str
    dim: int
    manifest: dict[str, Any]

    @property
    def experts(self) -> list[str]:
        return list(self.router.experts_)

    @property
    def costs(self) -> dict[str, CostModel]:
        """How each expert's cost was reckoned at fitting (empty when fitted without costs)."""
        return {n: CostModel.from_json(m) for n, m in self.manifest.get("costs", {}).items()}


def save(
    path: Path,
    router: ClusterRouter,
    *,
    embedder: str,
    dim: int,
    stats: dict[str, Any],
    costs: Mapping[str, CostModel] | None = None,
) -> None:
    """`costs`: how the records' costs were reckoned per expert (kept so that serving reckons
    a request's cost the same way)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "cluster",
        "embedder": {"name": embedder, "dim": dim},
        "experts": router.experts_,
        "params": {
            "n_clusters_requested": router.n_clusters,
            "n_clusters": len(router.centroids_),
            "random_state": router.random_state,
            "prior_strength": router.prior_strength,
            "ood_quantile": router.ood_quantile,
            "ood_margin": router.ood_margin,
        },
        "ood_threshold": router.ood_threshold_,
        "calibration": {**stats, "distance": router.calibration_distance_},
    }
    names: tuple[str, ...] = _ARRAYS
    if router.has_costs:
        if costs is None:
            raise ValueError("a router fitted with costs needs the cost models they came from")
        manifest["costs"] = {name: model.as_json() for name, model in costs.items()}
        names = (*_ARRAYS, *_COST_ARRAYS)
    with replace_folder(path) as tmp:
        np.savez(tmp / "arrays.npz", **{name: getattr(router, name) for name in names})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def load(path: Path) -> RouterArtifact:
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        arrays = np.load(path / "arrays.npz")
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"no router artifact at {path} ({Path(exc.filename).name} missing)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"unreadable router artifact at {path}: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"router artifact {path} has format version {manifest.get('format_version')}, "
            f"this Chorus reads version {FORMAT_VERSION}; refit it with `chorus router fit`"
        )
    params = manifest["params"]
    router = ClusterRouter(
        params["n_clusters_requested"],
        random_state=params["random_state"],
        prior_strength=params["prior_strength"],
        ood_quantile=params["ood_quantile"],
        ood_margin=params["ood_margin"],
    )
    for name in _ARRAYS:
        setattr(router, name, arrays[name])
    if "costs" in manifest:
        for name in _COST_ARRAYS:
            setattr(router, name, arrays[name])
    router.experts_ = list(manifest["experts"])
    router.ood_threshold_ = float(manifest["ood_threshold"])
    router.calibration_distance_ = manifest["calibration"]["distance"]
    embedder = manifest["embedder"]
    return RouterArtifact(router, embedder["name"], int(embedder["dim"]), manifest)


def check_compatible(
    artifact: RouterArtifact, *, experts: Sequence[str], embedder: str, dim: int | None = None
) -> None:
    """Refuse an artifact fitted for other experts or another embedder."""
    if sorted(artifact.experts) != sorted(experts):
        raise ArtifactError(
            f"the router artifact was fitted for experts {sorted(artifact.experts)}, "
            f"but the pool has {sorted(experts)}; refit it with `chorus router fit`"
        )
    if artifact.embedder != embedder:
        raise ArtifactError(
            f"the router artifact was fitted with embedder {artifact.embedder!r}, "
            f"but the config uses {embedder!r}"
        )
    if dim is not None and artifact.dim != dim:
        raise ArtifactError(
            f"the router artifact has {artifact.dim}-dimensional centroids, "
            f"the embedder gives {dim}"
        )
