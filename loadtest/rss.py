"""The soak test's memory check: a server process's RSS (with its children), sampled while load
runs, and the verdict on its growth."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any


def rss_bytes(pid: int) -> int:
    """Resident set size of a process and its children (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        return _proc_rss(pid)
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return int(total)


def rss_or_none(pid: int | None) -> int | None:
    """RSS, or None without a pid or when the process is gone (its requests fail instead)."""
    if pid is None:
        return None
    try:
        return rss_bytes(pid)
    except Exception:
        return None


def _proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pid_listening_on(port: int) -> int | None:
    """The process that listens on a local TCP port, if psutil can see it."""
    try:
        import psutil
    except ImportError:
        return None
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
                return int(conn.pid)
    return None


async def sample_rss(pid: int, interval_s: float, out: list[tuple[float, int]], t0: float) -> None:
    while True:
        with contextlib.suppress(Exception):
            out.append((time.perf_counter() - t0, rss_bytes(pid)))
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def sampling_rss(
    pid: int | None, interval_s: float, out: list[tuple[float, int]], t0: float
) -> AsyncIterator[None]:
    """`sample_rss` into `out` while the block runs (nothing without a pid)."""
    if pid is None:
        yield
        return
    sampler = asyncio.create_task(sample_rss(pid, interval_s, out, t0))
    try:
        yield
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


def rss_verdict(
    samples: Sequence[tuple[float, int]],
    *,
    warmup_s: float,
    window_s: float = 60.0,
    max_growth: float = 0.10,
) -> dict[str, Any]:
    """Median RSS of the first window after warm-up against the median of the last window.

    `samples` are (seconds since load start, bytes). When the run is too short for two full
    windows after warm-up, both windows shrink to half of what is left.
    """
    if not samples:
        return {"ok": False, "reason": "no RSS samples"}
    end = samples[-1][0]
    window = min(window_s, max((end - warmup_s) / 2, 0.0))
    first = [b for t, b in samples if warmup_s <= t <= warmup_s + window]
    last = [b for t, b in samples if t >= end - window]
    if not first or not last:
        return {"ok": False, "reason": "too few RSS samples after warm-up"}
    base, final = statistics.median(first), statistics.median(last)
    growth = final / base - 1.0
    return {
        "ok": growth <= max_growth,
        "baseline_bytes": base,
        "final_bytes": final,
        "growth": growth,
        "window_s": window,
        "baseline_window": (warmup_s, warmup_s + window),
        "final_window": (end - window, end),
        "peak_bytes": max(b for _, b in samples),
        "samples": len(samples),
    }
