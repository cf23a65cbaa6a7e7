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

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "prepare":
            return _prepare(load_config(args.config) if args.config else None)
        config = load_config(args.config)
        if args.command == "check-config":
            print(f"{args.config}: ok ({len(config.experts)} experts, {len(config.pools)} pools)")
            return 0
        if args.command == "serve":
            return _serve(config, args.host, args.port)
        if args.command == "bench":
            return asyncio.run(_bench(config, args.tokens, args.repeats))
    except ConfigError as exc:
        print(f"chorus: invalid config\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 1


def _prepare(config: Config | None) -> int:
    from tqdm import tqdm

    from serving import bundled

    if config is None:
        names = list(bundled.BUNDLED)
    else:
        refs = [e.model for e in config.experts.values()] + [config.router.embedder]
        names = [r.removeprefix("bundled:") for r in refs if r.startswith("bundled:")]
    with tqdm(names, desc="preparing bundled models", unit="model") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            started = time.perf_counter()
            was_ready = bundled.is_prepared(name)
            path = bundled.prepare(name)
            state = "cached" if was_ready else f"prepared in {time.perf_counter() - started:.1f}s"
            bar.write(f"{name}: {state} -> {path}")
    return 0


def _serve(config: Config, host: str, port: int) -> int:
    import uvicorn

    from serving.app import create_app

    uvicorn.run(create_app(config), host=host, port=port, log_level="info", access_log=False)
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
