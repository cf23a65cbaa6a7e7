"""`chorus prepare` (the bundled models a config uses), `chorus finetune` (a LoRA specialist of a
bundled model) and `chorus bench` (tokens/s per expert)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from serving.cli.common import add_config
from serving.config import Config, load_config


def add_parsers(commands: Any) -> None:
    prepare = commands.add_parser(
        "prepare", help="convert the bundled models a config uses (idempotent)"
    )
    prepare.add_argument("--config", type=Path, help="default: every bundled model")
    prepare.set_defaults(run=run_prepare)

    finetune = commands.add_parser(
        "finetune",
        help="train a LoRA adapter of a small model on calibration records (resumable)",
    )
    finetune.add_argument("--model", required=True, help="`bundled:<name>` or a folder")
    finetune.add_argument("--data", required=True, type=Path, help="records (JSONL)")
    finetune.add_argument("--category", help="only the records of this category")
    finetune.add_argument("--out", required=True, type=Path, help="the adapter's folder")
    finetune.add_argument("--epochs", type=float, default=1.0)
    finetune.add_argument("--rank", type=int, default=8)
    finetune.add_argument("--learning-rate", type=float, default=2e-4)
    finetune.add_argument("--accumulate", type=int, default=8, help="records per step")
    finetune.add_argument("--max-records", type=int, help="the first N records only")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(run=run_finetune)

    bench = commands.add_parser("bench", help="single-stream greedy tokens/s of each expert")
    add_config(bench)
    bench.add_argument("--tokens", default=64, type=int, help="tokens generated per prompt")
    bench.add_argument("--repeats", default=3, type=int)
    bench.set_defaults(run=run_bench)


def run_prepare(args: argparse.Namespace) -> int:
    """Set-up: runs before any router artifact exists."""
    from tqdm import tqdm

    from serving.models import bundled

    config = load_config(args.config, check_artifacts=False) if args.config else None
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


def run_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from serving.models.finetune import FinetuneSettings, finetune, read_records

    records = list(read_records(args.data, args.category))[: args.max_records]
    if not records:
        raise ValueError(
            f"{args.data} has no records" + f" of category {args.category!r}" * bool(args.category)
        )
    settings = FinetuneSettings(
        model=args.model,
        epochs=args.epochs,
        rank=args.rank,
        learning_rate=args.learning_rate,
        accumulate=args.accumulate,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with tqdm(desc=f"fine-tuning on {len(records)} records", unit="step") as bar:

        def progress(step: int, steps: int, loss: float) -> None:
            bar.total = steps
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.refresh()

        finetune(settings, records, args.out, progress)
    (args.out / "COMMAND").write_text(args.command_line + "\n")
    print(f"adapter -> {args.out}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    return asyncio.run(_bench(load_config(args.config), args.tokens, args.repeats))


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
