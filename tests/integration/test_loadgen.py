"""The load generator against the real server: a short burst, no errors, plausible figures."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.client import RequestOptions, run_jobs
from loadtest.scenarios import SCENARIOS, jobs_for
from loadtest.stats import summarize_phase
from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration


def test_short_burst_has_no_errors_and_sane_numbers(server: ServerProcess) -> None:
    scenario = SCENARIOS["standard"]
    jobs = list(jobs_for(scenario, 2))  # 2 rounds x 2 targets, one streamed round
    results, wall = asyncio.run(
        run_jobs(server.url, jobs, 2, RequestOptions(max_tokens=4, temperature=0), timeout_s=60)
    )
    rows = summarize_phase(results, wall, scenario.targets)
    total = rows[-1]
    assert total["target"] == "all" and total["requests"] == 4
    assert total["errors"] == 0, [r.error for r in results]
    assert 0 < total["p50_s"] <= total["p99_s"] < wall + 0.01
    assert all(0 < r.completion_tokens <= 4 for r in results)
    streamed = [r for r in results if r.stream]
    assert streamed and all(r.ttft is not None and 0 < r.ttft <= r.latency for r in streamed)
    assert total["tokens_per_s"] > 0
