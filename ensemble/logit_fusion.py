"""Dynamic Logit Fusion maths ("On Giant's Shoulders", Fan et al. 2024): small specialists steer
a large model of their family at decoding time.

At each step `P~ = softmax(M_L + sum_t a_t (M_t - M_S))` over the shared vocabulary, with `M_L`
the large model's logits, `M_S` the small base model's and `M_t` each specialist's. Each `a_t` is
searched on a grid (0 to 2 by 0.1 in the paper), one specialist at a time with the others at 0
(the paper's multi-task speed-up), as the minimiser of

    (KL(P~ || P_L) - KL(Q_t || Q_S))^2 + (KL(P_L || P~) - KL(Q_S || Q_t))^2

so that the large model moves away from itself as far as the specialist moved away from its base,
measured both ways. Log-probabilities stand in for logits: they differ by one constant per model,
which the softmax removes. Pure functions over numpy arrays, property-tested without models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
FLOOR = -1e4  # stands in for -inf (a token an engine masked), so that differences stay finite


def _finite(logp: FloatArray) -> FloatArray:
    out: FloatArray = np.maximum(np.asarray(logp, dtype=np.float64), FLOOR)
    return out


def normalise(logits: FloatArray) -> FloatArray:
    """Log-probabilities from logits along the last axis."""
    top = logits.max(axis=-1, keepdims=True)
    out: FloatArray = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
    return out


def kl(p: FloatArray, q: FloatArray) -> FloatArray:
    """KL(p || q) of log-probability rows along the last axis."""
    out: FloatArray = np.sum(np.exp(p) * (p - q), axis=-1)
    return out


def grid(max_alpha: float = 2.0, step: float = 0.1) -> FloatArray:
    """0, step, ..., max_alpha (both ends included)."""
    return np.round(np.arange(0.0, max_alpha + step / 2, step), 10)


def alpha_losses(
    large: FloatArray, base: FloatArray, expert: FloatArray, alphas: FloatArray
) -> FloatArray:
    """The KL-matching loss of each `alphas` value for one specialist (all as log-probs).

    With D = M_t - M_S and log P~ = M_L + a D - lse(a) (M_L normalised): KL(P~ || P_L) =
    a E_P~[D] - lse(a) and KL(P_L || P~) = lse(a) - a E_P_L[D], so each grid point costs one
    exponential over the vocabulary, not three (this runs at every step over ~150k tokens)."""
    large, base, expert = _finite(large), _finite(base), _finite(expert)
    shift = expert - base
    target_forward = float(np.exp(expert) @ shift)  # KL(Q_t || Q_S)
    target_reverse = float(-(np.exp(base) @ shift))  # KL(Q_S || Q_t)
    large = normalise(large)
    weights = np.multiply.outer(alphas, shift)  # a D, one row per grid point; then in place
    weights += large
    top = weights.max(axis=1, keepdims=True)
    weights -= top
    np.exp(weights, out=weights)
    total = weights.sum(axis=1)
    lse = top[:, 0] + np.log(total)
    mean_shift = (weights @ shift) / total  # E_P~[D]
    forward = alphas * mean_shift - lse
    reverse = lse - alphas * float(np.exp(large) @ shift)
    out: FloatArray = (forward - target_forward) ** 2 + (reverse - target_reverse) ** 2
    return out


def search_alpha(
    large: FloatArray, base: FloatArray, expert: FloatArray, alphas: FloatArray
) -> float:
    """The grid value of least loss; the smallest of equal ones (stay nearest the large model)."""
    return float(alphas[int(np.argmin(alpha_losses(large, base, expert, alphas)))])


def steer(
    large: FloatArray, base: FloatArray, experts: Sequence[FloatArray], alphas: Sequence[float]
) -> FloatArray:
    """log P~ = log softmax(M_L + sum_t a_t (M_t - M_S))."""
    logits = _finite(large).copy()
    for expert, alpha in zip(experts, alphas, strict=True):
        if alpha:
            logits += alpha * (_finite(expert) - _finite(base))
    return normalise(logits)
