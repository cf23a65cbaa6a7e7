"""The `chorus` command: serve a config, prepare bundled models, fit routers, evaluate.

Each subcommand is one function in the module of its topic (`serve`, `models`, `routing`,
`evaluation`), registered on the parser with `set_defaults(run=...)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from router.artifact import ArtifactError
from serving.cli import evaluation, models, routing, serve
from serving.cli.common import Refused, fail
from serving.config import ConfigError


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(prog="chorus", description=__doc__.splitlines()[0])
    out.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = out.add_subparsers(dest="command", required=True)
    for topic in (serve, models, routing, evaluation):
        topic.add_parsers(commands)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.command_line = " ".join(["chorus", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for chatty in ("httpx", "matplotlib"):  # a line per request or font scan drowns progress
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        return fail(f"invalid config\n{exc}")
    except (Refused, ValueError, ArtifactError) as exc:
        return fail(str(exc))
    return code
