"""What the benchmark scripts' command lines share."""

from __future__ import annotations

import argparse
import signal


def concurrencies(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers, e.g. `8,32`."""
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency: comma-separated positive integers")
    return values


def stop_servers_on_sigterm() -> None:
    """A SIGTERM becomes a KeyboardInterrupt, so the servers a script started are stopped on
    the way out (its `finally` blocks run)."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
