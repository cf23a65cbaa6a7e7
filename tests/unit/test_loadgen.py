"""The load generator's pure parts: percentiles, summaries, request schedule, the RSS verdict."""

from __future__ import annotations

import math

import pytest

from loadtest.client import Result
from loadtest.rss import rss_verdict
from loadtest.scenarios import SCENARIOS, jobs_for
from loadtest.stats import p50_ratio, percentile, summarize, summarize_phase


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def result(target: str, latency: float, *, tokens: int = 10, **kw: object) -> Result:
    r = Result(target, bool(kw.pop("stream", False)), 0.0)
    r.latency, r.completion_tokens = latency, tokens
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_summary_counts_errors_and_measures_only_successes() -> None:
    rows = [
        result("a", 1.0, stream=True, ttft=0.2),
        result("a", 2.0),
        result("a", 30.0, tokens=0, error="HTTP 502"),
        result("a", 3.0, stream=True, ttft=0.4),
    ]
    row = summarize(rows, wall_s=4.0, target="a")
    assert row["requests"] == 4 and row["errors"] == 1 and row["error_rate"] == 0.25
    assert row["p50_s"] == 2.0  # the failed request's 30 s is not a latency
    assert row["ttft_p50_s"] == pytest.approx(0.3)
    assert row["completion_tokens"] == 30 and row["tokens_per_s"] == 7.5
    assert row["requests_per_s"] == 0.75


def test_phase_rows_per_target_add_up_to_all_and_ratio() -> None:
    results = [result("auto", 1.1), result("expert", 1.0), result("auto", 1.1)]
    rows = summarize_phase(results, 2.0, ["auto", "expert"])
    assert [r["target"] for r in rows] == ["auto", "expert", "all"]
    assert rows[0]["tokens_per_s"] + rows[1]["tokens_per_s"] == rows[2]["tokens_per_s"]
    assert p50_ratio(rows, "auto", "expert") == pytest.approx(1.1)
    assert math.isnan(p50_ratio(rows, "auto", "missing"))


def test_rounds_give_every_target_the_same_prompt_and_mode() -> None:
    scenario = SCENARIOS["standard"]
    rounds = 2 * len(scenario.prompts)
    jobs = list(jobs_for(scenario, rounds))
    assert len(jobs) == rounds * len(scenario.targets)
    for k in range(rounds):
        round_jobs = [j for j in jobs if j.round == k]
        assert {j.target for j in round_jobs} == set(scenario.targets)
        assert len({(j.prompt, j.stream) for j in round_jobs}) == 1
    # over two passes of the prompts: both modes equally often, each prompt sent both ways
    for t in scenario.targets:
        assert sum(j.stream for j in jobs if j.target == t) == rounds // 2
    first = [j for j in jobs if j.prompt == scenario.prompts[0]]
    assert {j.stream for j in first} == {False, True}
    # no target always goes first
    assert len({jobs[k * len(scenario.targets)].target for k in range(rounds)}) > 1


def test_rss_verdict_compares_minute_medians_after_warmup() -> None:
    flat = [(t, 100) for t in range(0, 600, 5)]
    assert rss_verdict(flat, warmup_s=60)["growth"] == 0.0
    assert rss_verdict(flat, warmup_s=60)["ok"]
    # a big start-up spike inside the warm-up does not count; growth at the end does
    growing = [(t, 500 if t < 60 else 100 + (t // 300) * 20) for t in range(0, 600, 5)]
    verdict = rss_verdict(growing, warmup_s=60)
    assert verdict["growth"] == pytest.approx(0.2) and not verdict["ok"]
    # short runs shrink both windows instead of failing
    short = [(t, 100) for t in range(0, 30, 2)]
    assert rss_verdict(short, warmup_s=10)["ok"]
    assert not rss_verdict([], warmup_s=10)["ok"]


def test_even_prompt_count_still_sends_each_prompt_both_ways() -> None:
    scenario = SCENARIOS["standard"]
    even = type(scenario)("even", "", ("a", "b"), ("p1", "p2", "p3", "p4"))
    jobs = [j for j in jobs_for(even, 8) if j.target == "a"]
    assert sum(j.stream for j in jobs) == 4
    assert all({j.stream for j in jobs if j.prompt == p} == {False, True} for p in even.prompts)
