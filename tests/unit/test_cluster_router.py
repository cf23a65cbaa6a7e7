"""The cluster router on synthetic embeddings: planted structure, OOD, artifacts, batching."""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

import numpy as np
import pytest

from ensemble.types import ChatMessage
from router import artifact
from router.calibration import load_calibration
from router.cluster import ClusterRouter, NotFittedError, cap_clusters
from router.embedder import BatchingEmbedder
from router.query import query_text

EXPERTS = ["geo", "math", "words"]


def blobs(n_per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three tight clusters on the unit sphere; expert i is right on cluster i only."""
    rng = np.random.default_rng(seed)
    centers = np.eye(16)[:3]
    X, labels = [], []
    for i, center in enumerate(centers):
        points = center + 0.08 * rng.standard_normal((n_per, 16))
        X.append(points / np.linalg.norm(points, axis=1, keepdims=True))
        labels += [i] * n_per
    y = np.array(labels)
    scores = (y[:, None] == np.arange(3)[None, :]).astype(float)
    return np.concatenate(X).astype(np.float32), scores, y


def test_route_before_fit_raises() -> None:
    with pytest.raises(NotFittedError):
        ClusterRouter().route(np.zeros((1, 4), dtype=np.float32))


def test_fit_returns_self_and_caps_clusters() -> None:
    X, scores, _ = blobs(20)
    router = ClusterRouter(n_clusters=64)
    assert router.fit(X, scores, EXPERTS) is router
    assert len(router.centroids_) == cap_clusters(64, 60) == 7


def test_planted_clusters_route_to_their_expert() -> None:
    X, scores, _ = blobs(40, seed=1)
    router = ClusterRouter(n_clusters=6).fit(X, scores, EXPERTS)
    X_new, _, y_new = blobs(30, seed=2)
    decisions = router.route(X_new, top_k=3)
    picked = np.array([EXPERTS.index(d.experts[0]) for d in decisions])
    assert (picked == y_new).mean() >= 0.95
    for d in decisions:
        assert sorted(d.experts) == sorted(EXPERTS)
        assert sum(d.weights) == pytest.approx(1.0)
        assert all(w >= 0 for w in d.weights)
        assert not d.ood


def test_far_query_is_ood_and_uses_the_global_ranking() -> None:
    X, scores, _ = blobs(40)
    scores[:, 2] += 0.001  # "words" is best overall by a hair
    scores = np.clip(scores, 0, 1)
    router = ClusterRouter(n_clusters=6).fit(X, scores, EXPERTS)
    far = np.eye(16)[10:11].astype(np.float32)  # orthogonal to every cluster
    (decision,) = router.route(far, top_k=1)
    assert decision.ood
    assert decision.experts == ("words",)
    (near,) = router.route(X[:1], top_k=1)
    assert not near.ood


def test_artifact_round_trip_gives_identical_routes(tmp_path: Path) -> None:
    X, scores, _ = blobs(30)
    router = ClusterRouter(n_clusters=5).fit(X, scores, EXPERTS)
    artifact.save(tmp_path / "r", router, embedder="emb", dim=16, stats={"queries": 90})
    loaded = artifact.load(tmp_path / "r")
    assert loaded.experts == EXPERTS and loaded.embedder == "emb" and loaded.dim == 16
    assert loaded.manifest["calibration"]["queries"] == 90
    X_new, _, _ = blobs(10, seed=5)
    assert loaded.router.route(X_new, top_k=2) == router.route(X_new, top_k=2)


def test_mismatched_artifact_is_refused(tmp_path: Path) -> None:
    X, scores, _ = blobs(30)
    router = ClusterRouter(n_clusters=5).fit(X, scores, EXPERTS)
    artifact.save(tmp_path / "r", router, embedder="emb", dim=16, stats={})
    loaded = artifact.load(tmp_path / "r")
    artifact.check_compatible(loaded, experts=["words", "geo", "math"], embedder="emb", dim=16)
    with pytest.raises(artifact.ArtifactError, match="fitted for experts"):
        artifact.check_compatible(loaded, experts=["geo", "math"], embedder="emb")
    with pytest.raises(artifact.ArtifactError, match="embedder 'emb'"):
        artifact.check_compatible(loaded, experts=EXPERTS, embedder="other")
    with pytest.raises(artifact.ArtifactError, match="16-dimensional"):
        artifact.check_compatible(loaded, experts=EXPERTS, embedder="emb", dim=384)
    with pytest.raises(artifact.ArtifactError, match="no router artifact"):
        artifact.load(tmp_path / "missing")
    manifest = tmp_path / "r" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version": 9'))
    with pytest.raises(artifact.ArtifactError, match="format version 9"):
        artifact.load(tmp_path / "r")


def test_query_text_defaults_to_the_last_user_message() -> None:
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "What is 2 + 2?"),
        ChatMessage("assistant", "4"),
        ChatMessage("user", "And times 3?"),
    ]
    assert query_text(messages) == "And times 3?"
    assert query_text(messages, include_system=True) == "Be brief.\nAnd times 3?"
    assert query_text(messages, history_turns=2) == "What is 2 + 2?\n4\nAnd times 3?"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "q", "scores": {"geo": 1}}', "scores name"),
        ('{"query": "q", "scores": {"geo": 1, "math": 2, "words": 0}}', r"in \[0, 1\]"),
        ('{"scores": {}}', "string `query`"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_calibration_records_name_their_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text('{"query": "ok", "scores": {"geo": 1, "math": 0, "words": 0}}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_calibration(path, EXPERTS)
    assert f"{path}:2" in str(info.value)


class HashEmbedder:
    """Deterministic fake: a text's vector depends on the text alone."""

    name = "hash"
    dim = 8

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        rng = [np.random.default_rng(zlib.crc32(t.encode())) for t in texts]
        return np.stack([r.standard_normal(8) for r in rng]).astype(np.float32)


def test_concurrent_queries_share_encode_calls_and_get_their_own_vectors() -> None:
    fake = HashEmbedder()
    batcher = BatchingEmbedder(fake, wait_ms=5)
    texts = [f"query {i}" for i in range(64)]

    async def run() -> list[np.ndarray]:
        return list(await asyncio.gather(*(batcher.embed(t) for t in texts)))

    vectors = asyncio.run(run())
    assert sum(fake.calls) == 64
    assert len(fake.calls) <= 4  # batched, not one call per query
    expected = HashEmbedder().encode(texts)
    assert all(np.array_equal(v, e) for v, e in zip(vectors, expected, strict=True))
