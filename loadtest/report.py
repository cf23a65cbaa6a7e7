"""loadtest/RESULTS.md: the Markdown a benchmark prints and appends there (tables, wrapped prose,
the command that was run), and the load test's section."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import ROOT
from loadtest.scenarios import Scenario
from loadtest.stats import failed_requests, p50_ratio

RESULTS = ROOT / "loadtest" / "RESULTS.md"


def cell(x: float, digits: int = 3) -> str:
    """A figure for a table cell; `–` for a missing one (None or nan)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The load test's rows (`loadtest.stats.summarize`, with their concurrency) as a table."""
    head = (
        "| concurrency | target | requests | errors | error rate | p50 s | p90 s | p99 s "
        "| TTFT p50 s | TTFT p99 s | completion tok/s | req/s | tok/request |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        name = f"**{r['target']}**" if r["target"] == "all" else f"`{r['target']}`"
        lines.append(
            f"| {r.get('concurrency', '')} | {name} | {r['requests']} | {r['errors']} "
            f"| {r['error_rate']:.1%} | {cell(r['p50_s'])} | {cell(r['p90_s'])} "
            f"| {cell(r['p99_s'])} | {cell(r['ttft_p50_s'])} | {cell(r['ttft_p99_s'])} "
            f"| {cell(r['tokens_per_s'], 1)} | {cell(r['requests_per_s'], 2)} "
            f"| {cell(r['tokens_per_request'], 1)} |"
        )
    return "\n".join(lines)


def append_results(title: str, body: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else "# Recorded results\n"
    path.write_text(text.rstrip("\n") + f"\n\n## {title}\n\n{body.strip()}\n")


def command_line(drop: tuple[str, ...] = ("--note", "--json-out", "--results-file")) -> str:
    """This run's command, without the options that do not change what is measured."""
    script = os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "loadtest/load.py"
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in drop:
            skip = True
        elif not arg.startswith(tuple(f"{d}=" for d in drop)):
            argv.append(arg)
    return shlex.join([".venv/bin/python", script, *argv])


def wrap(text: str, width: int = 100) -> str:
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def results_section(
    args: argparse.Namespace,
    scenario: Scenario,
    rows: Sequence[dict[str, Any]],
    verdict: dict[str, Any] | None,
    plot_path: Path | None,
    loadavg: tuple[float, float, float] | None,
) -> str:
    """The load test's section: the command, what was measured and how, the table, the p50
    ratio of the scenario's pair, the soak verdict and the plot; `loadavg` at the start."""
    where = f"a fresh `chorus serve --config {args.config}`" if args.config else args.url
    amount = f"for {args.duration:g} s" if args.duration else f"{args.requests} requests per target"
    parts = [
        f"```bash\n{command_line()}\n```",
        f"Scenario `{scenario.name}`: {scenario.description}. Against {where}; "
        f"{amount} at each concurrency (closed loop), `max_tokens` {args.max_tokens}, "
        f"temperature {'the server default' if args.temperature is None else args.temperature}. "
        "Latency is the whole request as the client saw it; TTFT is over streamed requests; "
        "tokens/s is completion tokens (from `usage`) over the phase's wall time.",
    ]
    if loadavg:
        parts[-1] += (
            f" Machine: {os.cpu_count()} cores; 1-minute load average {loadavg[0]:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end (the server and this client included)."
        )
    if args.note:
        parts.append(args.note)
    parts[1:] = [wrap(part) for part in parts[1:]]
    parts.append(table(rows))
    if scenario.compare:
        parts.append(_ratio_line(args.concurrency, rows, *scenario.compare))
    if verdict is not None:
        parts.append(_soak_paragraph(args, rows, verdict))
    if plot_path is not None:
        rel = os.path.relpath(plot_path, args.results_file.parent)
        parts.append(f"![{plot_path.stem}]({rel})")
    return "\n\n".join(parts)


def _ratio_line(
    concurrencies: Sequence[int], rows: Sequence[dict[str, Any]], a: str, b: str
) -> str:
    lines = []
    for conc in concurrencies:
        phase = [r for r in rows if r["concurrency"] == conc]
        lines.append(f"c={conc}: **{p50_ratio(phase, a, b):.3f}**")
    return wrap(f"p50 of `{a}` over p50 of `{b}`, same run: " + "; ".join(lines) + ".")


def _soak_paragraph(
    args: argparse.Namespace, rows: Sequence[dict[str, Any]], verdict: dict[str, Any]
) -> str:
    if "growth" not in verdict:
        return f"RSS verdict: FAIL ({verdict.get('reason')})."
    passed = verdict["ok"] and not failed_requests(rows)
    return wrap(
        f"Server RSS (process and children, sampled every {args.rss_interval:g} s): "
        f"median {verdict['baseline_bytes'] / 2**20:.0f} MiB over "
        f"{verdict['baseline_window'][0]:.0f}-{verdict['baseline_window'][1]:.0f} s, "
        f"{verdict['final_bytes'] / 2**20:.0f} MiB over "
        f"{verdict['final_window'][0]:.0f}-{verdict['final_window'][1]:.0f} s: growth "
        f"**{verdict['growth']:+.1%}** (limit {args.max_rss_growth:.0%}); peak "
        f"{verdict['peak_bytes'] / 2**20:.0f} MiB. "
        f"Verdict: **{'pass' if passed else 'FAIL'}**."
    )
