"""Public benchmarks end to end with real models: split, calibrate, fit, evaluate, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

EXPERTS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]


def chorus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


def test_a_small_public_benchmark_run_from_split_to_report(tmp_path: Path) -> None:
    # Short items only (one letter, a few words, a number): the long ones cost a minute each.
    sizes = "mmlu=2,arc_challenge=1,triviaqa=2,arithmetic=2"
    made = chorus("dataset", "--benchmarks", sizes, "--out-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    config = tmp_path / "c.yaml"
    config.write_text(
        "experts:\n" + "".join(f"  {e}: {{model: bundled:{e}}}\n" for e in EXPERTS) + "pools:\n"
        f"  auto: {{experts: [{', '.join(EXPERTS)}], router: {{artifact: routers/auto}}}}\n"
        f"  fuse: {{experts: [{', '.join(EXPERTS)}], strategy: {{type: fuse}},"
        " router: {artifact: routers/auto}}\n"
    )
    records = tmp_path / "calibration-auto.jsonl"
    calibration = str(tmp_path / "calibration.jsonl")
    calibrated = chorus("calibrate", "--config", str(config), "--pool", "auto",
                        "--data", calibration, "--out", str(records))  # fmt: skip
    assert calibrated.returncode == 0, calibrated.stderr
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 7 and not (tmp_path / "calibration-auto.jsonl.partial").exists()
    for row in rows:
        assert set(row["scores"]) == set(EXPERTS)
        assert all(row["tokens"][e]["prompt"] > 0 for e in EXPERTS)  # what each answer cost
        assert all(row["seconds"][e] > 0 for e in EXPERTS)
        if row["category"] in {"mmlu", "arc_challenge"}:  # one letter
            assert all(row["tokens"][e]["completion"] == 1 for e in EXPERTS)

    artifact = str(tmp_path / "routers" / "auto")
    fit = chorus("router", "fit", "--config", str(config), "--pool", "auto", "--data",
                 str(records), "--out", artifact, "--clusters", "2")  # fmt: skip
    assert fit.returncode == 0, fit.stderr

    out = tmp_path / "report"
    evaluated = chorus("eval", "--config", str(config), "--data", str(tmp_path / "test.jsonl"),
                       "--models", ",".join([*EXPERTS, "auto", "fuse"]), "--out", str(out),
                       "--concurrency", "2")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["categories"] == ["arc_challenge", "arithmetic", "mmlu", "triviaqa"]
    assert summary["oracle"]["answers"] == 7
    for model in [*EXPERTS, "auto", "fuse"]:
        stats = summary["models"][model]
        assert stats["answers"] == 7 and stats["errors"] == 0
        assert stats["mean_tokens"] > stats["mean_completion_tokens"] > 0
    # A pool's accuracy is its answers' accuracy; the oracle is at least every expert's.
    assert summary["oracle"]["accuracy"] >= max(summary["models"][e]["accuracy"] for e in EXPERTS)
    assert sum(sum(n.values()) for n in summary["models"]["auto"]["routed"].values()) == 7
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    letters = [r for r in results if r["category"] == "mmlu"]
    # Multiple choice is read from the first token's log-probabilities, the fused ones for `fuse`.
    assert all(r["first_token_logprobs"] for r in letters)
    assert all(r["read"] in {"A", "B", "C", "D"} for r in letters)
    report = (out / "report.md").read_text()
    assert "| oracle of" in report and (out / "accuracy.png").stat().st_size > 10_000
