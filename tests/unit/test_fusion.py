"""Fusion maths on synthetic candidates: alignment, weights, fusion and the choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble import fusion
from ensemble.stepwise import DraftRounds
from ensemble.types import Candidate, NextTokens


def view(**probs: float) -> NextTokens:
    total = sum(probs.values())
    cands = tuple(
        Candidate(
            text.replace("_", " ") if text != "END" else "", math.log(p / total), end=text == "END"
        )
        for text, p in probs.items()
    )
    return NextTokens(cands, entropy=1.0)


def test_union_keeps_the_primary_order_first() -> None:
    a, b = view(_Paris=0.7, _Lima=0.3), view(_Lima=0.6, _Rome=0.4)
    assert fusion.union_keys([a, b]) == [" Paris", " Lima", " Rome"]


def test_missing_strings_are_estimated_from_prefixes_or_a_floor() -> None:
    a = view(_Par=0.8, _L=0.2)
    keys = [" Par", " L", " Paris", " Rome"]
    row = fusion.expert_matrix([a], keys)[0]
    raw = np.array([0.8, 0.2, 0.8 * 4 / 6, 0.5 * 0.2])
    assert row == pytest.approx(raw / raw.sum())


@settings(max_examples=60)
@given(
    st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3), min_size=1, max_size=4),
    st.sampled_from(["uniform", "core"]),
)
def test_weights_are_a_distribution_and_core_anchors_the_primary(
    rows: list[list[float]], weighting: str
) -> None:
    views = [view(_a=r[0], _b=r[1], END=r[2]) for r in rows]
    keys = fusion.union_keys(views)
    matrix = fusion.expert_matrix(views, keys)
    assert np.allclose(matrix.sum(axis=1), 1) and (matrix > 0).all()
    if weighting == "core":
        weights, filters = fusion.core_weights(matrix)
        assert weights[0] >= 0.5 - 1e-9
        assert (filters >= 0).all()
    else:
        weights, filters = fusion.uniform_weights(len(views)), None
    assert (weights >= 0).all() and weights.sum() == pytest.approx(1)
    fused = fusion.fuse(matrix, weights, filters)
    assert (fused >= 0).all() and fused.sum() == pytest.approx(1)


def test_one_expert_fuses_to_itself() -> None:
    a = view(_x=0.5, _y=0.3, END=0.2)
    keys = fusion.union_keys([a])
    matrix = fusion.expert_matrix([a], keys)
    assert fusion.fuse(matrix, fusion.uniform_weights(1)) == pytest.approx(matrix[0])


def test_static_weights_normalise_and_ignore_unknown_experts() -> None:
    weights = fusion.static_weights(["a", "b"], {"a": 3, "b": 1, "c": 5})
    assert weights == pytest.approx([0.75, 0.25])


def test_greedy_pick_keeps_the_primary_token_when_the_choice_only_cuts_it_differently() -> None:
    rng = np.random.default_rng(0)
    keys = [" Par", " Paris", " Lima"]
    fused = np.array([0.3, 0.5, 0.2])
    assert fusion.pick(keys, fused, " Par", temperature=0, top_p=1, rng=rng) == 0
    assert fusion.pick(keys, fused, " Lima", temperature=0, top_p=1, rng=rng) == 1


def test_sampled_pick_respects_top_p() -> None:
    rng = np.random.default_rng(0)
    keys = ["a", "b", "c"]
    fused = np.array([0.6, 0.3, 0.1])
    picks = {fusion.pick(keys, fused, "a", temperature=1, top_p=0.5, rng=rng) for _ in range(50)}
    assert picks == {0}
    picks = {fusion.pick(keys, fused, "a", temperature=1, top_p=1, rng=rng) for _ in range(200)}
    assert picks == {0, 1, 2}


@settings(max_examples=30)
@given(st.integers(2, 3), st.integers(0, 10_000))
def test_kl_centroid_weights_are_a_distribution(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dists = [np.log(p) for p in rng.dirichlet(np.ones(50), size=n)]
    weights = fusion.kl_centroid_weights(dists)
    assert (weights >= -1e-12).all() and weights.sum() == pytest.approx(1)
    pooled = fusion.log_linear(dists, weights)
    assert np.exp(pooled).sum() == pytest.approx(1)


def test_kl_centroid_weights_of_identical_experts_keep_their_distribution() -> None:
    p = np.log(np.array([0.5, 0.3, 0.2]))
    weights = fusion.kl_centroid_weights([p, p.copy()])
    assert fusion.log_linear([p, p], weights) == pytest.approx(p)


def test_draft_rounds_follow_the_acceptance_and_report_the_mean_length() -> None:
    rounds = DraftRounds(8)
    assert (rounds.length, rounds.acceptance, rounds.mean_length) == (4, None, None)
    rounds.add(4, 4)  # taken whole: one more
    assert rounds.length == 5
    rounds.add(5, 1)  # one past the accepted pieces, never under 2
    assert rounds.length == 2
    rounds.add(2, 0)
    assert rounds.length == 2
    assert rounds.acceptance == round(5 / 11, 4)
    assert rounds.mean_length == round(11 / 3, 4)
    assert DraftRounds(3).length == 3  # capped at the most
