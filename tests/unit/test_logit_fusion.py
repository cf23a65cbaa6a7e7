"""Dynamic Logit Fusion maths on hand-made distributions (`ensemble.logit_fusion`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble import logit_fusion as dlf

GRID = dlf.grid()


def logp(*probs: float) -> np.ndarray:
    p = np.array(probs, dtype=np.float64)
    return np.log(p / p.sum())


def loss_by_hand(large: np.ndarray, base: np.ndarray, expert: np.ndarray, alpha: float) -> float:
    """The paper's objective written out term by term, token by token."""
    raw = [math.exp(x + alpha * (e - b)) for x, e, b in zip(large, expert, base, strict=True)]
    fused = [math.log(r / sum(raw)) for r in raw]

    def kl(p: list[float] | np.ndarray, q: list[float] | np.ndarray) -> float:
        return sum(math.exp(a) * (a - b) for a, b in zip(p, q, strict=True))

    return (kl(fused, large) - kl(expert, base)) ** 2 + (kl(large, fused) - kl(base, expert)) ** 2


def test_the_grid_is_the_papers() -> None:
    assert len(GRID) == 21 and GRID[0] == 0.0 and GRID[-1] == 2.0
    assert np.allclose(np.diff(GRID), 0.1)


def test_the_losses_are_the_objective_term_by_term() -> None:
    large, base, expert = logp(5, 3, 2), logp(4, 4, 2), logp(2, 6, 2)
    losses = dlf.alpha_losses(large, base, expert, GRID)
    by_hand = [loss_by_hand(large, base, expert, a) for a in GRID]
    assert np.allclose(losses, by_hand, atol=1e-12)
    assert dlf.search_alpha(large, base, expert, GRID) == GRID[int(np.argmin(by_hand))]


def test_a_large_model_equal_to_the_base_takes_the_whole_shift() -> None:
    """With P_L = Q_S, alpha = 1 gives P~ = Q_t: both KL terms match exactly (loss 0)."""
    base, expert = logp(6, 3, 1), logp(1, 3, 6)
    assert dlf.search_alpha(base, base, expert, GRID) == 1.0
    assert np.allclose(dlf.steer(base, base, [expert], [1.0]), expert)


def test_an_expert_equal_to_its_base_moves_nothing() -> None:
    large, base = logp(5, 3, 2), logp(1, 1, 8)
    assert dlf.search_alpha(large, base, base.copy(), GRID) == 0.0
    for alpha in GRID:
        assert np.allclose(dlf.steer(large, base, [base.copy()], [float(alpha)]), large)


def test_alpha_zero_is_the_large_model() -> None:
    large, base, expert = logp(5, 3, 2), logp(4, 4, 2), logp(2, 6, 2)
    assert np.allclose(dlf.steer(large, base, [expert], [0.0]), large)


def test_the_minimiser_is_the_smallest_of_equal_losses() -> None:
    """An expert that moved nowhere: every alpha gives loss 0 when large == base == expert."""
    p = logp(3, 2, 1)
    assert np.allclose(dlf.alpha_losses(p, p, p, GRID), 0.0)
    assert dlf.search_alpha(p, p, p, GRID) == 0.0


def test_masked_tokens_stay_finite() -> None:
    large = np.array([0.0, -np.inf, -np.inf])
    base = np.log(np.array([0.5, 0.5, 1e-9]))
    expert = np.array([-np.inf, 0.0, -np.inf])
    losses = dlf.alpha_losses(large, base, expert, GRID)
    assert np.isfinite(losses).all()
    assert np.isfinite(dlf.steer(large, base, [expert], [1.0])).all()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=2, max_value=40),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.lists(st.floats(0, 2), min_size=1, max_size=3),
)
def test_steering_gives_a_distribution(size: int, seed: int, alphas: list[float]) -> None:
    rng = np.random.default_rng(seed)
    large, base, *experts = (dlf.normalise(rng.normal(size=size) * 3) for _ in [*alphas, 0, 0])
    out = dlf.steer(large, base, experts, alphas)
    assert math.isclose(float(np.exp(out).sum()), 1.0, rel_tol=1e-9)
    assert dlf.search_alpha(large, base, experts[0], GRID) in GRID


@pytest.mark.parametrize("alphas", [[0.5, 0.0], [1.0, 2.0]])
def test_several_specialists_add_their_shifts(alphas: list[float]) -> None:
    large, base = logp(5, 3, 2, 1), logp(4, 4, 1, 1)
    first, second = logp(1, 6, 2, 1), logp(2, 1, 1, 6)
    want = large + alphas[0] * (first - base) + alphas[1] * (second - base)
    assert np.allclose(dlf.steer(large, base, [first, second], alphas), dlf.normalise(want))
