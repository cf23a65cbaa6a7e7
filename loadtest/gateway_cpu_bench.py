"""Gateway CPU per streamed request: two checkouts of Chorus side by side, one fake upstream.

    .venv/bin/python loadtest/gateway_cpu_bench.py --before a364cdc [--requests 400] [--rounds 3]

A change to the request path (admission, the request scope, response shaping) is measured here
without a model in the way: the upstream is a loopback OpenAI-compatible server that streams 16
chunks at once, so nearly all the CPU Chorus spends is its own. `--before REV` is checked out in a
temporary git worktree; both gateways run from this checkout's venv, each on its own code, and
are driven alternately (the order flipped each round) with the same streamed requests. Prints,
per side, the gateway process's user+system CPU per request and the client's p50 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from loadtest import ROOT
from loadtest.client import RequestOptions, run_jobs
from loadtest.scenarios import Job
from loadtest.servers import Subprocess, free_port
from loadtest.stats import percentile


async def _models(_: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})


async def _chat(request: Request) -> StreamingResponse:
    await request.json()

    async def events() -> AsyncIterator[str]:
        for i in range(16):
            choice = {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}
            if i == 15:
                choice["finish_reason"] = "stop"
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {"prompt_tokens": 5, "completion_tokens": 16}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def serve_upstream(port: int) -> None:
    app = Starlette(
        routes=[
            Route("/v1/models", _models),
            Route("/v1/chat/completions", _chat, methods=["POST"]),
        ]
    )
    uvicorn.run(app, port=port, log_level="warning")


def start_gateway(tree: Path, config: Path) -> Subprocess:
    port = free_port()
    argv = [sys.executable, "-m", "serving", "serve", "--config", str(config), "--port", str(port)]
    server = Subprocess(
        argv, f"http://127.0.0.1:{port}/health", cwd=tree, env={"PYTHONPATH": str(tree)}
    )
    server.wait_ready(60)
    return server


def measure(server: Subprocess, requests: int, concurrency: int) -> tuple[float, float]:
    """(gateway CPU ms per request, client p50 ms) for one round."""
    process = psutil.Process(server.pid)
    before = sum(process.cpu_times()[:2])
    url = server.health_url.removesuffix("/health")
    jobs = [Job("m", "hi", True, 0)] * requests
    results, _ = asyncio.run(run_jobs(url, jobs, concurrency, RequestOptions(max_tokens=16)))
    spent = sum(process.cpu_times()[:2]) - before
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
    return spent / requests * 1000, percentile([r.latency for r in results], 50) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chorus-cpu-bench-"))
    before_tree = work / "before"
    subprocess.run(["git", "worktree", "add", "-q", str(before_tree), args.before], check=True)
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from loadtest.gateway_cpu_bench import serve_upstream as s; s({upstream_port})",
        ]
    )
    config = work / "c.yaml"
    config.write_text(
        f"experts:\n  m: {{engine: openai, base_url: 'http://127.0.0.1:{upstream_port}/v1', "
        "model: m}\n"
    )
    servers: dict[str, Subprocess] = {}
    try:
        servers = {
            "before": start_gateway(before_tree, config),
            "after": start_gateway(ROOT, config),
        }
        for server in servers.values():
            measure(server, 50, args.concurrency)  # warm-up, untimed
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
            for name in order:
                rows[name].append(measure(servers[name], args.requests, args.concurrency))
        cpu = {name: sum(r[0] for r in rs) / len(rs) for name, rs in rows.items()}
        for name, rs in rows.items():
            per_round = ", ".join(f"{c:.2f} ms CPU / p50 {p:.1f} ms" for c, p in rs)
            print(f"{name} ({args.before if name == 'before' else 'this checkout'}): {per_round}")
        print(f"gateway CPU per request, after / before: {cpu['after'] / cpu['before']:.3f}")
    finally:
        for server in servers.values():
            server.stop()
        upstream.terminate()
        subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], check=False)


if __name__ == "__main__":
    main()
