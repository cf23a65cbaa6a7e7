"""The load generator's client: one chat completion timed as the client sees it, and a closed loop
of them (any OpenAI-compatible server)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.scenarios import Job


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
    on_result: Callable[[Result], None] | None = None,
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
