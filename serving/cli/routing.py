"""`chorus router fit` (a pool's router from calibration records) and `chorus route`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serving.cli.common import Refused, add_config, pool_config


def add_parsers(commands: Any) -> None:
    router = commands.add_parser("router", help="fit routers").add_subparsers(
        dest="router_command", required=True
    )
    fit = router.add_parser("fit", help="fit a pool's router from calibration records")
    add_config(fit)
    fit.add_argument("--pool", required=True)
    fit.add_argument("--data", required=True, type=Path, help="calibration JSONL")
    fit.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    fit.add_argument("--clusters", type=int, default=64)
    fit.add_argument("--holdout", type=float, default=0.2)
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(run=run_fit)

    route = commands.add_parser("route", help="route queries with a fitted artifact; JSON lines")
    add_config(route)
    route.add_argument("--pool", required=True)
    route.add_argument("--artifact", type=Path, help="default: the pool's own")
    route.add_argument("--query", required=True, action="append", dest="queries")
    route.set_defaults(run=run_route)


def run_fit(args: argparse.Namespace) -> int:
    from router import artifact
    from router.calibration import fit_router, load_calibration
    from serving.models.embedders import load_embedder

    config = pool_config(args)
    data = load_calibration(args.data, config.pools[args.pool].experts)
    embedder = load_embedder(config.router.embedder, config.router.backend)
    router, stats = fit_router(
        data, embedder, n_clusters=args.clusters, holdout=args.holdout, seed=args.seed
    )
    stats["data"] = str(args.data)
    artifact.save(args.out, router, embedder=embedder.name, dim=embedder.dim, stats=stats)
    report = stats["holdout"]
    print(
        f"{args.out}: {len(router.centroids_)} clusters from {stats['queries']} queries "
        f"(OOD threshold {router.ood_threshold_:.3f})"
    )
    if report.get("holdout_queries"):
        print(
            f"held out {report['holdout_queries']}: router's top expert is the best one "
            f"{report['router_top1_is_best']:.1%} of the time; always "
            f"{report['global_best_expert']} {report['global_best_is_best']:.1%}. "
            f"Mean score: router {report['router_mean_score']:.3f}, "
            f"best single expert {report['global_best_mean_score']:.3f}, "
            f"oracle {report['oracle_mean_score']:.3f}"
        )
    return 0


def run_route(args: argparse.Namespace) -> int:
    from router import artifact
    from serving.models.embedders import load_embedder

    config = pool_config(args)
    settings = config.pools[args.pool].router
    folder = args.artifact or (Path(settings.artifact) if settings else None)
    if folder is None:
        raise Refused(f"pool {args.pool!r} has no router; pass --artifact")
    fitted = artifact.load(folder)
    embedder = load_embedder(config.router.embedder, config.router.backend)
    artifact.check_compatible(
        fitted, experts=config.pools[args.pool].experts, embedder=embedder.name, dim=embedder.dim
    )
    decisions = fitted.router.route(
        embedder.encode(args.queries),
        top_k=settings.top_k if settings else len(fitted.experts),
        clusters_considered=settings.clusters_considered if settings else 3,
        beta=settings.beta if settings else 10.0,
    )
    for decision in decisions:
        row = {
            "experts": list(decision.experts),
            "weights": list(decision.weights),
            "cluster": decision.cluster,
            "distance": decision.distance,
            "ood": decision.ood,
        }
        print(json.dumps(row))
    return 0
