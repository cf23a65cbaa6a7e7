"""`chorus serve` and `chorus check-config`."""

from __future__ import annotations

import argparse
from types import FrameType
from typing import Any

from serving.cli.common import add_config
from serving.config import load_config


def add_parsers(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve a config over the OpenAI API")
    add_config(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", default=8000, type=int)
    serve.set_defaults(run=run_serve)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    add_config(check)
    check.set_defaults(run=run_check_config)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain: no new connections, `/health` 503 and new
    requests refused on open ones, requests in flight finish (up to `shutdown_grace_s`), then
    the engines are closed. SIGHUP reloads the config file."""
    import uvicorn

    from serving.http.app import create_app

    config = load_config(args.config)
    app = create_app(config, config_path=args.config)
    runtime = app.state.chorus.runtime

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            runtime.draining = True
            super().handle_exit(sig, frame)

    settings = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=config.server.shutdown_grace_s,
    )
    DrainingServer(settings).run()
    return 0


def run_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.experts)} experts, {len(config.pools)} pools)")
    return 0
