"""Token-level fusion maths across vocabularies: align candidates on text, weight, fuse, pick.

Pure functions over `NextTokens`, so the rules are property-tested without models.

Alignment (UniTE/GaC style): the candidate set is the union of every expert's top-k candidate
strings ("" is end-of-sequence). Expert e's probability for a string u is its own where u is among
its candidates. Where it is not, the estimate is: if one of e's candidates c and u are prefixes of
one another (" Par" and " Paris": the same text cut at other token boundaries), p_e(c) times
len(shorter)/len(longer); otherwise half of e's smallest kept probability, since u fell below its
top-k. Each expert's row is then renormalised over the union.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from ensemble.types import NextTokens

FloatArray = npt.NDArray[np.float64]
END = ""  # the key of the end-of-sequence candidate


def union_keys(views: Sequence[NextTokens]) -> list[str]:
    """Every candidate string once: the primary's first (in its order), then the others'."""
    keys: dict[str, None] = {}
    for view in views:
        for c in sorted(view.candidates, key=lambda c: -c.logprob):
            keys.setdefault(c.text, None)
    return list(keys)


def _estimate(view: NextTokens, key: str) -> float:
    own = {c.text: math.exp(c.logprob) for c in view.candidates}
    if key in own:
        return own[key]
    related = [
        p * min(len(key), len(text)) / max(len(key), len(text))
        for text, p in own.items()
        if key and text and (key.startswith(text) or text.startswith(key))
    ]
    return max(related) if related else 0.5 * min(own.values(), default=1.0)


def expert_matrix(views: Sequence[NextTokens], keys: Sequence[str]) -> FloatArray:
    """(n_experts, n_keys): each expert's distribution over the union, rows summing to 1."""
    matrix = np.array([[_estimate(v, k) for k in keys] for v in views], dtype=np.float64)
    matrix = np.maximum(matrix, 1e-12)
    out: FloatArray = matrix / matrix.sum(axis=1, keepdims=True)
    return out


def uniform_weights(n: int) -> FloatArray:
    return np.full(n, 1.0 / n)


def static_weights(experts: Sequence[str], weights: Mapping[str, float]) -> FloatArray:
    raw = np.array([max(weights.get(e, 0.0), 0.0) for e in experts], dtype=np.float64)
    return raw / raw.sum() if raw.sum() > 0 else uniform_weights(len(experts))


def rbf_filter(delta: FloatArray, beta: float = 2.0) -> FloatArray:
    """CoRE's token-level low-pass filter: 1 where an expert agrees with the reference, 0 at
    the largest disagreement. f(d) = (e^(-beta d) - e^(-beta)) / (1 - e^(-beta))."""
    out: FloatArray = (np.exp(-beta * delta) - math.exp(-beta)) / (1.0 - math.exp(-beta))
    return out


def core_weights(matrix: FloatArray, beta: float = 2.0) -> tuple[FloatArray, FloatArray]:
    """CoRE model-level weights and token-level filters; row 0 is the primary.

    Token level: s_t = f(|p_e - p*|) against the mean distribution p*. Model level: s_m = sum of
    s_t over the union / entropy of p_e; the primary is anchored at s_m >= the others' sum, so it
    keeps at least half the weight. Returns (weights summing to 1, filters with mean 1 per row).
    """
    reference = matrix.mean(axis=0)
    filters = rbf_filter(np.abs(matrix - reference), beta)
    entropy = -(matrix * np.log(matrix)).sum(axis=1)
    model = filters.sum(axis=1) / np.maximum(entropy, 1e-6)
    if len(model) > 1:
        model[0] = max(model[0], model[1:].sum())
    weights = model / model.sum()
    means = filters.mean(axis=1, keepdims=True)
    return weights, filters / np.maximum(means, 1e-12)


def fuse(matrix: FloatArray, weights: FloatArray, filters: FloatArray | None = None) -> FloatArray:
    """The weighted mixture over the union (the primary unfiltered, as CoRE), renormalised."""
    rows = matrix.copy()
    if filters is not None:
        rows[1:] = rows[1:] * filters[1:]
    mixed = weights @ rows
    out: FloatArray = mixed / mixed.sum()
    return out


def pick(
    keys: Sequence[str],
    fused: FloatArray,
    primary_top: str,
    *,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
) -> int:
    """The chosen key's index: greedy with CoRE's substring guard, or sampled.

    Guard: when the fused choice and the primary's own top choice are prefixes of one another,
    the primary's wins (the difference is only where the tokens are cut).
    """
    if temperature == 0:
        choice = int(np.argmax(fused))
        key = keys[choice]
        if (
            key
            and primary_top
            and key != primary_top
            and (key.startswith(primary_top) or primary_top.startswith(key))
        ):
            return keys.index(primary_top)
        return choice
    logits = np.log(np.maximum(fused, 1e-300)) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]
        probs[order[before >= top_p]] = 0.0
        probs /= probs.sum()
    return int(rng.choice(len(keys), p=probs))


def kl_centroid_weights(
    distributions: Sequence[FloatArray], grid: Sequence[float] = tuple(np.arange(0, 1.01, 0.1))
) -> FloatArray:
    """Per-step weights for experts sharing one vocabulary: the KL centroid of each pair.

    Each other expert t is searched alone: the mixture log p(a) = (1 - a) log p_primary +
    a log p_t, with a on `grid`, that is equidistant in KL from both,
    argmin (KL(p(a)||p_primary) - KL(p(a)||p_t))^2. Borrowed from Dynamic Logit Fusion's
    search, but without its base model to measure a task shift against (that is
    `ensemble.logit_fusion`). The experts' shares a_t / T and 1 - sum of them are the
    log-linear weights returned. `distributions` are log-probabilities over the shared
    vocabulary, the primary first.
    """
    primary, others = distributions[0], distributions[1:]
    if not others:
        return np.ones(1)
    alphas = []
    for other in others:
        best, best_loss = 0.0, math.inf
        for a in grid:
            mixed = (1 - a) * primary + a * other
            mixed = mixed - np.logaddexp.reduce(mixed)
            p = np.exp(mixed)
            loss = (float(p @ (mixed - primary)) - float(p @ (mixed - other))) ** 2
            if loss < best_loss - 1e-12:
                best, best_loss = float(a), loss
        alphas.append(best / len(others))
    return np.array([1.0 - sum(alphas), *alphas])


def log_linear(distributions: Sequence[FloatArray], weights: FloatArray) -> FloatArray:
    """Log-probabilities of the weighted log-linear pool, renormalised."""
    mixed = sum(w * d for w, d in zip(weights, distributions, strict=True))
    out: FloatArray = np.asarray(mixed - np.logaddexp.reduce(mixed), dtype=np.float64)
    return out
