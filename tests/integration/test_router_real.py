"""The router with the real bundled embedder: planted truth, OOD, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from router.calibration import CalibrationSet, fit_router
from router.embedder import Embedder, SentenceTransformerEmbedder
from router.onnx import OnnxEmbedder
from serving.evaluation.datasets import CAPITALS, generate
from serving.models.embedders import load_embedder
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

EXPERTS = ["geographer", "calculator"]
COUNTRIES = sorted(CAPITALS)
GIBBERISH = [
    "xq zvbn qwrtp lkjh",
    "asdf ghjk zxcv bnm qwer",
    "blorf snerg quibble wump",
    "kkkk jjjj hhhh gggg",
    "zorp vlak thrumb ixx",
]


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    yield load_embedder("bundled:all-minilm-l6-v2")  # the serving default: ONNX Runtime


def test_onnx_embedder_gives_the_torch_vectors(embedder: Embedder) -> None:
    assert isinstance(embedder, OnnxEmbedder)
    torch_embedder = load_embedder("bundled:all-minilm-l6-v2", backend="torch")
    assert isinstance(torch_embedder, SentenceTransformerEmbedder)
    texts = [r["question"] for r in generate()["test"]][:64] + GIBBERISH + ["", "é" * 600]
    ours, theirs = embedder.encode(texts), torch_embedder.encode(texts)
    assert ours.shape == theirs.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert float((ours * theirs).sum(axis=1).min()) > 0.9999


def geography(countries: list[str]) -> list[str]:
    forms = [
        "What is the capital of {}?",
        "Which city is the capital of {}?",
        "Name the capital city of {}.",
    ]
    return [forms[i % 3].format(c) for i, c in enumerate(countries)]


def arithmetic(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    forms = ["What is {} + {}?", "Compute {} times {}.", "How much is {} minus {}?"]
    return [forms[i % 3].format(*rng.integers(2, 999, size=2)) for i in range(n)]


def planted(queries_geo: list[str], queries_math: list[str]) -> CalibrationSet:
    """The geographer is right on geography only, the calculator on arithmetic only."""
    queries = queries_geo + queries_math
    scores = np.array([[1.0, 0.0]] * len(queries_geo) + [[0.0, 1.0]] * len(queries_math))
    return CalibrationSet(queries, scores, EXPERTS)


def test_planted_truth_sends_unseen_queries_to_the_right_expert(
    embedder: Embedder,
) -> None:
    data = planted(geography(COUNTRIES[:24]), arithmetic(seed=1, n=24))
    router, stats = fit_router(data, embedder, n_clusters=8, seed=0)
    assert stats["holdout"]["router_top1_is_best"] >= 0.9

    unseen = {"geographer": geography(COUNTRIES[24:]), "calculator": arithmetic(seed=2, n=16)}
    for expert, queries in unseen.items():
        decisions = router.route(embedder.encode(queries), top_k=2)
        right = sum(d.experts[0] == expert for d in decisions)
        assert right / len(queries) >= 0.9, (expert, right, len(queries))
        assert not any(d.ood for d in decisions)


def test_gibberish_is_flagged_out_of_distribution(embedder: Embedder) -> None:
    data = planted(geography(COUNTRIES[:24]), arithmetic(seed=1, n=24))
    router, _ = fit_router(data, embedder, n_clusters=8, seed=0)
    decisions = router.route(embedder.encode(GIBBERISH), top_k=2)
    assert all(d.ood for d in decisions), [d.distance for d in decisions]
    # Words the calibration never saw, but real questions of a known kind, stay in distribution.
    new_words = [f"What is the capital of {c}?" for c in ["Chad", "Laos", "Fiji"]]
    assert not any(d.ood for d in router.route(embedder.encode(new_words)))


def test_fit_and_route_commands(tmp_path: Path) -> None:
    calib = tmp_path / "calib.jsonl"
    data = planted(geography(COUNTRIES[:24]), arithmetic(seed=1, n=24))
    with calib.open("w") as f:
        for query, row in zip(data.queries, data.scores, strict=True):
            scores = dict(zip(EXPERTS, map(float, row), strict=True))
            f.write(json.dumps({"query": query, "scores": scores}) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        "experts:\n"
        "  geographer: {model: bundled:smollm2-135m-instruct}\n"
        "  calculator: {model: bundled:gemma3-270m, chat_template: plain}\n"
        "pools:\n"
        "  p: {experts: [geographer, calculator], router: {artifact: routers/p, top_k: 2}}\n"
    )

    def chorus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "serving", *args],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip

    before = chorus("check-config", "--config", str(config))
    assert before.returncode == 2 and "pools.p.router.artifact: no router artifact" in before.stderr

    fit = chorus("router", "fit", "--config", str(config), "--pool", "p", "--data", str(calib),
                 "--out", str(tmp_path / "routers" / "p"), "--clusters", "8")  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    assert "router's top expert is the best one" in fit.stdout
    assert chorus("check-config", "--config", str(config)).returncode == 0

    routed = chorus("route", "--config", str(config), "--pool", "p",
                    "--query", "What is the capital of Peru?", "--query", "What is 12 + 30?",
                    "--query", GIBBERISH[0])  # fmt: skip
    assert routed.returncode == 0, routed.stderr
    rows = [json.loads(line) for line in routed.stdout.splitlines()]
    assert [r["experts"][0] for r in rows[:2]] == ["geographer", "calculator"]
    assert [r["ood"] for r in rows] == [False, False, True]
    for row in rows:
        assert set(row) == {"experts", "weights", "cluster", "distance", "ood"}
        assert sum(row["weights"]) == pytest.approx(1.0)

    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("calculator", "counter"))
    refused = chorus("check-config", "--config", str(other))
    assert refused.returncode == 2
    assert "pools.p.router.artifact: the router artifact was fitted for experts" in refused.stderr
