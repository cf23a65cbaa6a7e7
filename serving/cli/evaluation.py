"""`chorus dataset`, `chorus calibrate` and `chorus eval`: labeled questions, calibration
records, and evaluation reports."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from serving.cli.common import Refused, add_config, pool_config
from serving.config import load_config


def add_parsers(commands: Any) -> None:
    dataset = commands.add_parser(
        "dataset", help="write the project's labeled question set (calibration and test splits)"
    )
    dataset.add_argument("--out-dir", type=Path, default=Path("configs/data"))
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument(
        "--benchmarks",
        help="public benchmarks instead, with test sizes: mmlu=150,gsm8k=40,... "
        "(serving/evaluation/benchmarks.py)",
    )
    dataset.add_argument(
        "--calibration", help="calibration sizes, same form (default: as many as the test)"
    )
    dataset.set_defaults(run=run_dataset)

    calib = commands.add_parser(
        "calibrate", help="grade a pool's experts on labeled questions -> calibration records"
    )
    add_config(calib)
    calib.add_argument("--pool", required=True)
    calib.add_argument("--data", required=True, type=Path, help="labeled JSONL")
    calib.add_argument("--out", required=True, type=Path, help="calibration JSONL")
    calib.add_argument(
        "--max-tokens", type=int, default=48, help="for records that give no max_tokens"
    )
    calib.add_argument("--concurrency", type=int, default=4, help="questions in flight")
    calib.set_defaults(run=run_calibrate)

    evaluate = commands.add_parser(
        "eval", help="accuracy, latency and tokens of models and pools on labeled questions"
    )
    add_config(evaluate)
    evaluate.add_argument("--data", required=True, type=Path, help="labeled JSONL")
    evaluate.add_argument("--models", required=True, help="comma-separated model ids")
    evaluate.add_argument(
        "--from-results",
        type=Path,
        help="report on a results.jsonl of an earlier run instead of asking the models again",
    )
    evaluate.add_argument("--out", required=True, type=Path, help="report folder")
    evaluate.add_argument("--url", help="a running server; default: serve the config in-process")
    evaluate.add_argument("--limit", type=int, help="at most this many questions per category")
    evaluate.add_argument(
        "--max-tokens", type=int, default=48, help="for records that give no max_tokens"
    )
    evaluate.add_argument("--concurrency", type=int, default=1, help="questions in flight")
    evaluate.add_argument(
        "--skip",
        default="",
        help="model:category pairs not to run, comma-separated (reported as not run)",
    )
    evaluate.set_defaults(run=run_eval)


def run_dataset(args: argparse.Namespace) -> int:
    from router.files import write_jsonl
    from serving.evaluation.datasets import generate

    if args.benchmarks:
        from serving.evaluation.benchmarks import BENCHMARKS, build_splits, parse_counts

        try:
            test = parse_counts(args.benchmarks, 100)
            calibration = parse_counts(args.calibration, 100) if args.calibration else test
        except ValueError as e:
            raise Refused(str(e)) from None
        splits = build_splits(test, calibration)
        for name in dict.fromkeys([*calibration, *test]):
            b = BENCHMARKS[name]
            print(
                f"{name} ({b.kind}): test from {b.test_source}; calibration from "
                f"{b.calibration_source}; {b.license}"
            )
    else:
        splits = generate(args.seed)
    for split, records in splits.items():
        path = args.out_dir / f"{split}.jsonl"
        write_jsonl(path, records)
        print(f"{path}: {len(records)} questions")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from serving.evaluation.calibrate import calibrate, print_summary

    config = pool_config(args)
    summary = asyncio.run(
        calibrate(
            config,
            args.pool,
            args.data,
            args.out,
            max_tokens=args.max_tokens,
            concurrency=args.concurrency,
        )
    )
    print_summary(summary)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    return asyncio.run(_eval(args, args.command_line))


async def _eval(args: argparse.Namespace, command: str) -> int:
    from router.files import read_jsonl
    from serving.evaluation.calibrate import load_labeled
    from serving.evaluation.evaluate import (
        limit_per_category,
        run_eval,
        serve_in_process,
        summarize,
        write_report,
    )

    config = load_config(args.config)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = set(config.experts) | set(config.pools)
    unknown = [m for m in models if m not in known]
    if unknown:
        raise Refused(f"unknown model ids {unknown} (known: {sorted(known)})")
    skip = set()
    for pair in filter(None, (p.strip() for p in args.skip.split(","))):
        model, sep, category = pair.partition(":")
        if not sep or model not in models:
            raise Refused(f"--skip {pair!r}: expected model:category with a model of --models")
        skip.add((model, category))
    questions = limit_per_category(load_labeled(args.data), args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    experts = [m for m in models if m in config.experts]
    if args.from_results:
        results = [row for _, row in read_jsonl(args.from_results) if row["model"] in models]
        summary = summarize(results, models, experts=set(experts))
        write_report(args.out, results, summary, command, experts)
        _print(summary, args.out)
        return 0
    options = {
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "skip": skip,
        "progress": args.out / "results.jsonl.partial",
    }
    if args.url:
        results = await run_eval(args.url, models, questions, **options)
    else:
        async with serve_in_process(config) as url:
            results = await run_eval(url, models, questions, **options)
    (args.out / "results.jsonl.partial").unlink()
    summary = summarize(results, models, experts=set(experts))
    write_report(args.out, results, summary, command, experts)
    _print(summary, args.out)
    return 0


def _print(summary: dict[str, Any], out: Path) -> None:
    for model, stats in summary["models"].items():
        print(
            f"{model}: accuracy {stats['accuracy']:.3f} over {stats['answers']} answers, "
            f"{stats['mean_latency_s']:.2f} s and {stats['mean_completion_tokens']:.1f} "
            f"completion tokens per answer"
        )
    print(f"report: {out / 'report.md'}")
