"""`chorus router fit` (a pool's router from calibration records) and `chorus route`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serving.cli.common import Refused, add_config, pool_config
from serving.config.loading import priced


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

    curve = router.add_parser(
        "curve", help="accuracy against cost over quality_weight, on held-out records"
    )
    add_config(curve)
    curve.add_argument("--pool", required=True)
    curve.add_argument(
        "--data", required=True, type=Path, help="held-out records (chorus eval's records.jsonl)"
    )
    curve.add_argument("--grid", type=int, default=21, help="alphas from 0 to 1")
    curve.add_argument("--target", type=float, help="keep this share of the best expert's accuracy")
    curve.add_argument(
        "--cost-scale", choices=("cluster", "pool"), help="default: the pool's router setting"
    )
    curve.add_argument("--out", type=Path, help="folder for curve.json and curve.png")
    curve.set_defaults(run=run_curve)

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
    pool = config.pools[args.pool]
    data = load_calibration(args.data, pool.experts)
    prices = {
        e: priced(price) for e in pool.experts if (price := config.experts[e].price) is not None
    }
    costs = None
    if (data.tokens is not None and data.seconds is not None) or len(prices) == len(pool.experts):
        try:
            costs = data.cost_models(prices)
        except ValueError as exc:
            raise Refused(f"{args.config}: pools.{args.pool}: {exc}") from None
    embedder = load_embedder(config.router.embedder, config.router.backend)
    router, stats = fit_router(
        data,
        embedder,
        n_clusters=args.clusters,
        holdout=args.holdout,
        seed=args.seed,
        cost_models=costs,
    )
    stats["data"] = str(args.data)
    artifact.save(
        args.out, router, embedder=embedder.name, dim=embedder.dim, stats=stats, costs=costs
    )
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
    if costs is None:
        print(
            "no costs: the records do not say what answers took, and not every expert has a price"
        )
    for name, model in (costs or {}).items():
        print(
            f"cost of {name}: {model.per_prompt_token:.3g} {model.unit} per prompt token, "
            f"{model.per_completion_token:.3g} per completion token"
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


def run_curve(args: argparse.Namespace) -> int:
    import numpy as np

    from router import artifact
    from router.calibration import embed_all, load_calibration
    from router.curve import compute_curve
    from serving.evaluation.curve_report import print_curve, write_curve
    from serving.models.embedders import load_embedder

    config = pool_config(args)
    pool = config.pools[args.pool]
    if pool.router is None:
        raise Refused(f"pool {args.pool!r} has no router")
    fitted = artifact.load(Path(pool.router.artifact))
    if not fitted.router.has_costs:
        raise Refused(f"{pool.router.artifact}: fitted without costs; refit it (docs/routing.md)")
    data = load_calibration(args.data, fitted.experts)
    try:
        costs = data.costs(fitted.costs)
    except ValueError as exc:
        raise Refused(f"{args.data}: {exc}") from None
    embedder = load_embedder(config.router.embedder, config.router.backend)
    curve = compute_curve(
        fitted.router,
        embed_all(embedder, data.queries),
        data.scores,
        costs,
        grid=np.linspace(0, 1, args.grid).tolist(),
        clusters_considered=pool.router.clusters_considered,
        beta=pool.router.beta,
        cost_scale=args.cost_scale or pool.router.cost_scale,
        target=args.target,
    )
    unit = next(iter(fitted.costs.values())).unit
    print_curve(curve, unit)
    if args.out:
        write_curve(curve, args.out, unit=unit, command=args.command_line)
        print(f"wrote {args.out / 'curve.json'} and {args.out / 'curve.png'}")
    return 0
