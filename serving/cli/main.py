"""The `chorus` command: serve a config, prepare bundled models, measure experts."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from router.artifact import ArtifactError
from serving.config import Config, ConfigError, load_config

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chorus", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a config over the OpenAI API")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", default=8000, type=int)

    prepare = commands.add_parser(
        "prepare", help="convert the bundled models a config uses (idempotent)"
    )
    prepare.add_argument("--config", type=Path, help="default: every bundled model")

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", required=True, type=Path)

    bench = commands.add_parser("bench", help="single-stream greedy tokens/s of each expert")
    bench.add_argument("--config", required=True, type=Path)
    bench.add_argument("--tokens", default=64, type=int, help="tokens generated per prompt")
    bench.add_argument("--repeats", default=3, type=int)

    dataset = commands.add_parser(
        "dataset", help="write the project's labeled question set (calibration and test splits)"
    )
    dataset.add_argument("--out-dir", type=Path, default=Path("configs/data"))
    dataset.add_argument("--seed", type=int, default=0)

    calib = commands.add_parser(
        "calibrate", help="grade a pool's experts on labeled questions -> calibration records"
    )
    calib.add_argument("--config", required=True, type=Path)
    calib.add_argument("--pool", required=True)
    calib.add_argument("--data", required=True, type=Path, help="labeled JSONL")
    calib.add_argument("--out", required=True, type=Path, help="calibration JSONL")
    calib.add_argument("--max-tokens", type=int, default=48)

    router = commands.add_parser("router", help="fit routers").add_subparsers(
        dest="router_command", required=True
    )
    fit = router.add_parser("fit", help="fit a pool's router from calibration records")
    fit.add_argument("--config", required=True, type=Path)
    fit.add_argument("--pool", required=True)
    fit.add_argument("--data", required=True, type=Path, help="calibration JSONL")
    fit.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    fit.add_argument("--clusters", type=int, default=64)
    fit.add_argument("--holdout", type=float, default=0.2)
    fit.add_argument("--seed", type=int, default=0)

    route = commands.add_parser("route", help="route queries with a fitted artifact; JSON lines")
    route.add_argument("--config", required=True, type=Path)
    route.add_argument("--pool", required=True)
    route.add_argument("--artifact", type=Path, help="default: the pool's own")
    route.add_argument("--query", required=True, action="append", dest="queries")

    evaluate = commands.add_parser(
        "eval", help="accuracy, latency and tokens of models and pools on labeled questions"
    )
    evaluate.add_argument("--config", required=True, type=Path)
    evaluate.add_argument("--data", required=True, type=Path, help="labeled JSONL")
    evaluate.add_argument("--models", required=True, help="comma-separated model ids")
    evaluate.add_argument("--out", required=True, type=Path, help="report folder")
    evaluate.add_argument("--url", help="a running server; default: serve the config in-process")
    evaluate.add_argument("--limit", type=int, help="at most this many questions per category")
    evaluate.add_argument("--max-tokens", type=int, default=48)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("httpx", "matplotlib"):  # a line per request or font scan drowns progress
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        if args.command == "prepare":  # set-up: runs before any router artifact exists
            config = load_config(args.config, check_artifacts=False) if args.config else None
            return _prepare(config)
        if args.command == "dataset":
            return _dataset(args.out_dir, args.seed)
        # The commands that make router artifacts must not require them to exist already.
        making = args.command in ("calibrate", "router", "route")
        config = load_config(args.config, check_artifacts=not making)
        if making and args.pool not in config.pools:
            known = ", ".join(sorted(config.pools)) or "none"
            print(
                f"chorus: {args.config} has no pool {args.pool!r} (pools: {known})", file=sys.stderr
            )
            return EXIT_CONFIG
        if args.command == "check-config":
            print(f"{args.config}: ok ({len(config.experts)} experts, {len(config.pools)} pools)")
            return 0
        if args.command == "serve":
            return _serve(config, args.config, args.host, args.port)
        if args.command == "bench":
            return asyncio.run(_bench(config, args.tokens, args.repeats))
        if args.command == "calibrate":
            from serving.evaluation.calibrate import calibrate, print_summary

            print_summary(
                asyncio.run(
                    calibrate(config, args.pool, args.data, args.out, max_tokens=args.max_tokens)
                )
            )
            return 0
        if args.command == "router":
            return _fit(config, args)
        if args.command == "route":
            return _route(config, args.pool, args.artifact, args.queries)
        if args.command == "eval":
            return asyncio.run(_eval(config, args, " ".join(["chorus", *(argv or sys.argv[1:])])))
    except ConfigError as exc:
        print(f"chorus: invalid config\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ValueError, ArtifactError) as exc:
        print(f"chorus: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 1


async def _eval(config: Config, args: argparse.Namespace, command: str) -> int:
    from serving.evaluation.calibrate import load_labeled
    from serving.evaluation.evaluate import (
        limit_per_category,
        run_eval,
        serve_in_process,
        summarize,
        write_report,
    )

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = set(config.experts) | set(config.pools)
    unknown = [m for m in models if m not in known]
    if unknown:
        print(f"chorus: unknown model ids {unknown} (known: {sorted(known)})", file=sys.stderr)
        return EXIT_CONFIG
    questions = limit_per_category(load_labeled(args.data), args.limit)
    if args.url:
        results = await run_eval(args.url, models, questions, max_tokens=args.max_tokens)
    else:
        async with serve_in_process(config) as url:
            results = await run_eval(url, models, questions, max_tokens=args.max_tokens)
    summary = summarize(results, models)
    write_report(args.out, results, summary, command)
    for model, stats in summary["models"].items():
        print(
            f"{model}: accuracy {stats['accuracy']:.3f} over {stats['answers']} answers, "
            f"{stats['mean_latency_s']:.2f} s and {stats['mean_completion_tokens']:.1f} "
            f"completion tokens per answer"
        )
    print(f"report: {args.out / 'report.md'}")
    return 0


def _dataset(out_dir: Path, seed: int) -> int:
    from serving.evaluation.datasets import generate, write_jsonl

    for split, records in generate(seed).items():
        path = out_dir / f"{split}.jsonl"
        write_jsonl(path, records)
        print(f"{path}: {len(records)} questions")
    return 0


def _fit(config: Config, args: argparse.Namespace) -> int:
    from router import artifact
    from router.calibration import fit_router, load_calibration
    from serving.models.embedders import load_embedder

    experts = config.pools[args.pool].experts
    data = load_calibration(args.data, experts)
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


def _route(config: Config, pool: str, path: Path | None, queries: list[str]) -> int:
    from router import artifact
    from serving.models.embedders import load_embedder

    settings = config.pools[pool].router
    folder = path or (Path(settings.artifact) if settings else None)
    if folder is None:
        print(f"chorus: pool {pool!r} has no router; pass --artifact", file=sys.stderr)
        return EXIT_CONFIG
    fitted = artifact.load(folder)
    embedder = load_embedder(config.router.embedder, config.router.backend)
    artifact.check_compatible(
        fitted, experts=config.pools[pool].experts, embedder=embedder.name, dim=embedder.dim
    )
    decisions = fitted.router.route(
        embedder.encode(queries),
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


def _prepare(config: Config | None) -> int:
    from tqdm import tqdm

    from serving.models import bundled

    if config is None:
        names = list(bundled.BUNDLED)
    else:
        refs = [e.model for e in config.experts.values() if e.engine == "transformers"]
        refs.append(config.router.embedder)
        names = [r.removeprefix("bundled:") for r in refs if r.startswith("bundled:")]
    with tqdm(names, desc="preparing bundled models", unit="model") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            started = time.perf_counter()
            was_ready = bundled.is_prepared(name)
            path = bundled.prepare(name)
            state = "cached" if was_ready else f"prepared in {time.perf_counter() - started:.1f}s"
            bar.write(f"{name}: {state} -> {path}")
    if config is not None and config.router.backend == "onnx":
        from serving.models.embedders import load_embedder, onnx_folder

        load_embedder(config.router.embedder, "onnx")  # exports once, then only loads
        print(f"{config.router.embedder}: ONNX -> {onnx_folder(config.router.embedder)}")
    return 0


def _serve(config: Config, path: Path, host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT, then drain: no new connections, `/health` 503 and new
    requests refused on open ones, requests in flight finish (up to `shutdown_grace_s`), then
    the engines are closed. SIGHUP reloads `path`."""
    import uvicorn

    from serving.http.app import create_app

    app = create_app(config, config_path=path)
    runtime = app.state.runtime

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            runtime.draining = True
            super().handle_exit(sig, frame)

    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=config.server.shutdown_grace_s,
    )
    DrainingServer(settings).run()
    return 0


async def _bench(config: Config, tokens: int, repeats: int) -> int:
    """Greedy tokens/s per expert on fixed prompts, each expert alone (one stream at a time)."""
    from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
    from serving.engines import build_engine

    prompts = [
        "Write a short story about a lighthouse keeper.",
        "Explain how a bicycle works.",
        "List some facts about the Moon.",
    ]
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    for name, expert in config.experts.items():
        engine = build_engine(name, expert)
        started = time.perf_counter()
        await engine.start()
        load_s = time.perf_counter() - started
        generated, elapsed = 0, 0.0
        for i in range(repeats):
            for prompt in prompts:
                request = GenerationRequest(f"bench-{i}", (ChatMessage("user", prompt),), params)
                started = time.perf_counter()
                async for chunk in engine.generate(request):
                    generated += chunk.tokens
                elapsed += time.perf_counter() - started
        await engine.aclose()
        row = {
            "expert": name,
            "load_s": round(load_s, 2),
            "tokens": generated,
            "tokens_per_s": round(generated / elapsed, 1),
        }
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
