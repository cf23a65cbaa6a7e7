"""Load generator for Chorus (or any OpenAI-compatible server): latency, TTFT, tokens/s, errors.

    .venv/bin/python loadtest/load.py --config configs/default.yaml --scenario standard \
        --concurrency 8,32 --requests 64 --max-tokens 16 --append-results --plot
    .venv/bin/python loadtest/load.py --url http://127.0.0.1:8000 --scenario pools-mixed
    .venv/bin/python loadtest/load.py --config configs/default.yaml --soak --duration 600

(`.venv/bin/python -m loadtest.load ...` is the same.) `--config` starts a fresh `chorus serve`
on a free loopback port (waits for `/health` 200, stops it with SIGTERM at the end); `--url`
uses a running server. A scenario (data, in `loadtest.scenarios.SCENARIOS`) names the models to
load and the prompts; requests go out in rounds, every target getting the same prompt and the
same streamed/non-streamed mode in each round, so the targets' figures compare fairly within one
run. Each concurrency is a closed loop of that many clients. Tokens are counted from the
responses' `usage` (streamed: `stream_options.include_usage`).

`--soak` samples the server process's RSS every few seconds and exits 1 when the median of the
last minute is more than `--max-rss-growth` above the median of the first minute after
`--soak-warmup`, or when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest import ROOT
from loadtest.charts import plot_latency, plot_rss
from loadtest.cli import concurrencies, stop_servers_on_sigterm
from loadtest.client import RequestOptions, Result, run_jobs
from loadtest.report import RESULTS, append_results, results_section, table
from loadtest.rss import pid_listening_on, rss_or_none, rss_verdict, sampling_rss
from loadtest.scenarios import SCENARIOS, Scenario, jobs_for
from loadtest.servers import Subprocess, start_chorus
from loadtest.stats import p50_ratio, summarize_phase


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--config", type=Path, help="start a fresh `chorus serve` on this config")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default=None)
    p.add_argument("--targets", help="comma-separated model ids instead of the scenario's")
    p.add_argument("--concurrency", type=concurrencies, default=None, help="e.g. 8,32")
    p.add_argument("--requests", type=int, default=64, help="per target per concurrency")
    p.add_argument("--duration", type=float, help="seconds per concurrency (instead of --requests)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=None, help="default: the server's")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before measuring")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--api-key", default=os.environ.get("CHORUS_API_KEY"))
    p.add_argument("--soak", action="store_true", help="sample the server's RSS; fail on growth")
    p.add_argument("--server-pid", type=int, help="with --url and --soak: the server's pid")
    p.add_argument("--rss-interval", type=float, default=5.0)
    p.add_argument("--soak-warmup", type=float, default=60.0, help="seconds before the baseline")
    p.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--append-results", action="store_true", help="append to loadtest/RESULTS.md")
    p.add_argument("--results-file", type=Path, default=RESULTS)
    p.add_argument("--note", default="", help="a line for the RESULTS.md section")
    p.add_argument("--plot", nargs="?", const="auto", help="PNG path (default: loadtest/...)")
    p.add_argument("--json-out", type=Path, help="write every row (and RSS samples) as JSON")
    args = p.parse_args(argv)
    if args.scenario is None:
        args.scenario = "pools-mixed" if args.soak else "standard"
    if args.concurrency is None:
        args.concurrency = [4] if args.soak else [8, 32]
    if args.soak and args.duration is None:
        args.duration = 600.0
    return args


@dataclass
class Measured:
    """What the measured phases gathered, and when and on how loaded a machine they started."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)
    """RSS samples: (seconds since `t0`, bytes)."""
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    loadavg: tuple[float, float, float] = field(default_factory=os.getloadavg)
    t0: float = field(default_factory=time.perf_counter)
    """The first phase's start, from which RSS sample times and request starts count."""

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if not r.ok)


async def run(args: argparse.Namespace) -> int:
    scenario = chosen_scenario(args)
    opts = RequestOptions(args.max_tokens, args.temperature, args.api_key)
    server: Subprocess | None = None
    url = args.url
    try:
        if args.config is not None:
            server, url = start_chorus(args.config)
            wait_ready(server, url)
        pid = server_pid(args, server)
        if args.soak and pid is None:
            print("--soak needs the server's pid: use --config, or --server-pid", file=sys.stderr)
            return 2
        if args.warmup:
            await warm_up(url, scenario, opts, args.warmup, args.timeout)
        measured = Measured()
        for conc in args.concurrency:
            await run_phase(measured, url, pid, scenario, opts, conc, args)
        verdict = soak_verdict(args, measured.samples) if args.soak else None
        plot_path = save_plot(args, scenario, measured, verdict) if args.plot else None
        if args.json_out:
            write_json(args.json_out, measured, verdict)
        if args.append_results:
            record(args, scenario, measured, verdict, plot_path)
        return exit_code(measured.errors, verdict)
    finally:
        if server is not None:
            server.stop()


def chosen_scenario(args: argparse.Namespace) -> Scenario:
    """`--scenario`, with `--targets` in place of its own when given."""
    scenario = SCENARIOS[args.scenario]
    if not args.targets:
        return scenario
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return dataclasses.replace(scenario, targets=targets)


def wait_ready(server: Subprocess, url: str) -> None:
    ready = server.wait_ready()
    print(f"# chorus serve ready at {url} in {ready:.1f}s (pid {server.pid})")
    print(f"# server log: {server.log_path}")


def server_pid(args: argparse.Namespace, server: Subprocess | None) -> int | None:
    """The server's process: the one started here, `--server-pid`, or (soak) the one listening
    on `--url`'s port."""
    if server is not None:
        return server.pid
    if args.soak and args.server_pid is None:
        return pid_listening_on(httpx.URL(args.url).port or 80)
    pid: int | None = args.server_pid
    return pid


async def warm_up(
    url: str, scenario: Scenario, opts: RequestOptions, rounds: int, timeout_s: float
) -> None:
    warm = list(jobs_for(scenario, rounds))
    results, _ = await run_jobs(url, warm, min(len(warm), 4), opts, timeout_s=timeout_s)
    failed = [r for r in results if not r.ok]
    print(f"# warm-up: {len(results)} requests, {len(failed)} failed")
    for r in failed[:3]:
        print(f"#   {r.target}: {r.error}")


async def run_phase(
    measured: Measured,
    url: str,
    pid: int | None,
    scenario: Scenario,
    opts: RequestOptions,
    conc: int,
    args: argparse.Namespace,
) -> None:
    """One concurrency: a closed loop of `conc` clients (the server's RSS sampled meanwhile in a
    soak), its rows printed and added to `measured`."""
    rounds = None if args.duration else args.requests
    sampled = pid if args.soak else None
    rss_before = rss_or_none(pid)
    async with sampling_rss(sampled, args.rss_interval, measured.samples, measured.t0):
        results, wall = await run_jobs(
            url,
            jobs_for(scenario, rounds),
            conc,
            opts,
            duration_s=args.duration,
            timeout_s=args.timeout,
            on_result=progress_printer() if args.soak else None,
        )
    rss_after = rss_or_none(pid)
    if rss_after is not None and args.soak:
        measured.samples.append((time.perf_counter() - measured.t0, rss_after))
    phase = summarize_phase(results, wall, scenario.targets)
    for row in phase:
        row.update(concurrency=conc, rss_before_bytes=rss_before, rss_after_bytes=rss_after)
    measured.rows.extend(phase)
    measured.results.extend(results)
    print_phase(phase, results, scenario, conc)


def progress_printer(every: int = 100) -> Callable[[Result], None]:
    done = 0

    def progress(_: Result) -> None:
        nonlocal done
        done += 1
        if done % every == 0:
            print(f"#   {done} requests done", flush=True)

    return progress


def print_phase(
    phase: Sequence[dict[str, Any]], results: Sequence[Result], scenario: Scenario, conc: int
) -> None:
    print(table(phase), flush=True)
    if scenario.compare:
        ratio = p50_ratio(phase, *scenario.compare)
        a, b = scenario.compare
        print(f"# c={conc}: p50 {a} / {b} = {ratio:.3f}")
    for r in [r for r in results if not r.ok][:5]:
        print(f"#   error ({r.target}, stream={r.stream}): {r.error}")


def soak_verdict(args: argparse.Namespace, samples: Sequence[tuple[float, int]]) -> dict[str, Any]:
    verdict = rss_verdict(samples, warmup_s=args.soak_warmup, max_growth=args.max_rss_growth)
    print("# soak:", json.dumps(verdict, default=str))
    return verdict


def save_plot(
    args: argparse.Namespace,
    scenario: Scenario,
    measured: Measured,
    verdict: dict[str, Any] | None,
) -> Path:
    """Latency by concurrency, or in a soak the server's RSS, at `--plot` (or loadtest/plots/)."""
    stamp = measured.started_at.strftime("%Y%m%d-%H%M")
    kind = "soak-rss" if args.soak else f"{scenario.name}-latency"
    default = ROOT / "loadtest" / "plots" / f"{kind}-{stamp}.png"
    plot_path = default if args.plot == "auto" else Path(args.plot)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    if args.soak and verdict is not None:
        plot_rss(measured.samples, verdict, plot_path, f"server RSS, soak ({scenario.name})")
    else:
        plot_latency(measured.rows, plot_path, f"latency by concurrency ({scenario.name})")
    print(f"# plot: {plot_path}")
    return plot_path


def write_json(path: Path, measured: Measured, verdict: dict[str, Any] | None) -> None:
    requests = [{**vars(r), "start": r.start - measured.t0} for r in measured.results]
    path.write_text(
        json.dumps(
            {
                "rows": measured.rows,
                "rss": measured.samples,
                "verdict": verdict,
                "requests": requests,
            },
            default=str,
        )
    )


def record(
    args: argparse.Namespace,
    scenario: Scenario,
    measured: Measured,
    verdict: dict[str, Any] | None,
    plot_path: Path | None,
) -> None:
    """Append this run's section to `--results-file`."""
    body = results_section(args, scenario, measured.rows, verdict, plot_path, measured.loadavg)
    when = measured.started_at.strftime("%Y-%m-%d %H:%M UTC")
    kind = "soak" if args.soak else f"scenario `{scenario.name}`"
    append_results(f"{when} · load test, {kind}", body, args.results_file)
    print(f"# appended to {args.results_file}")


def exit_code(errors: int, verdict: dict[str, Any] | None) -> int:
    """1 for any failed request or a failed RSS verdict (each said), else 0."""
    bad_rss = verdict is not None and not verdict["ok"]
    if errors:
        print(f"# FAIL: {errors} failed requests")
    if verdict is not None and bad_rss:
        print("# FAIL: RSS grew past the limit" if "growth" in verdict else "# FAIL: no RSS")
    return 1 if errors or bad_rss else 0


def main(argv: Sequence[str] | None = None) -> int:
    stop_servers_on_sigterm()  # a server started with --config is stopped on the way out
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
