"""What every subcommand shares: its config, and how a refusal reaches the operator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.config import Config, load_config

EXIT_CONFIG = 2


class Refused(Exception):
    """A command that cannot run as asked; `str()` is the message (exit code 2)."""


def add_config(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--config", required=required, type=Path)


def pool_config(args: argparse.Namespace) -> Config:
    """The config of a command that works on one pool's router (`--pool`); the router artifact
    need not exist yet, since these commands make it."""
    config = load_config(args.config, check_artifacts=False)
    if args.pool not in config.pools:
        known = ", ".join(sorted(config.pools)) or "none"
        raise Refused(f"{args.config} has no pool {args.pool!r} (pools: {known})")
    return config


def fail(message: str) -> int:
    print(f"chorus: {message}", file=sys.stderr)
    return EXIT_CONFIG
