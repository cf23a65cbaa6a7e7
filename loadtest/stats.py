"""Summaries of a load test's results (pure): percentiles, a row per target, the p50 ratio."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from loadtest.client import Result


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: Sequence[Result], wall_s: float, target: str) -> dict[str, Any]:
    """One row: counts, latency percentiles (successful requests), TTFT, throughput over wall_s."""
    ok = [r for r in results if r.ok]
    latencies = [r.latency for r in ok]
    ttfts = [r.ttft for r in ok if r.stream and r.ttft is not None]
    tokens = sum(r.completion_tokens for r in ok)
    n = len(results)
    errors = n - len(ok)
    return {
        "target": target,
        "requests": n,
        "errors": errors,
        "error_rate": errors / n if n else 0.0,
        "p50_s": percentile(latencies, 50),
        "p90_s": percentile(latencies, 90),
        "p99_s": percentile(latencies, 99),
        "mean_s": statistics.fmean(latencies) if latencies else math.nan,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "streamed": sum(1 for r in results if r.stream),
        "completion_tokens": tokens,
        "tokens_per_request": tokens / len(ok) if ok else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
    }


def summarize_phase(
    results: Sequence[Result], wall_s: float, targets: Sequence[str]
) -> list[dict[str, Any]]:
    """A row per target (in `targets` order, then any others) and an `all` row.

    Per-target tokens/s is that target's share of the phase's throughput (its tokens over the
    phase's wall time), so the rows add up to the `all` row.
    """
    seen = list(dict.fromkeys([*targets, *(r.target for r in results)]))
    rows = [
        summarize([r for r in results if r.target == t], wall_s, t)
        for t in seen
        if any(r.target == t for r in results)
    ]
    if len(rows) > 1:
        rows.append(summarize(results, wall_s, "all"))
    return rows


def p50_ratio(rows: Sequence[dict[str, Any]], a: str, b: str) -> float:
    by = {r["target"]: r for r in rows}
    if a not in by or b not in by or not by[b]["p50_s"]:
        return math.nan
    return float(by[a]["p50_s"] / by[b]["p50_s"])


def failed_requests(rows: Sequence[dict[str, Any]]) -> int:
    """Failed requests over every phase's rows (the `all` rows left out: they repeat the rest)."""
    return sum(r["errors"] for r in rows if r["target"] != "all")
