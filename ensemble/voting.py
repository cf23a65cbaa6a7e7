"""Voting over sampled answers: majority with consistency weights, ties by log-probability.

Pure functions over `Sample`s, so the rules are tested without models.

Model-level consistency (the response-level analogue of CoRE's weights) for expert m, whose
samples give the answer distribution p_m:
- self-confidence   c_m = 1 - H(p_m) / log(n_m)   (1 when its samples all agree)
- agreement         a_m = 1 - TV(p_m, p_ref)      with p_ref the mean of every expert's p
- weight            w_m = c_m * a_m, the top expert anchored at w_top >= sum of the others (so
  it holds at least half the vote, as CoRE anchors its main model), then normalised to sum 1.
Each sample then carries w_m / n_m, so an expert's votes weigh w_m together. A sample with no
extractable answer votes for nothing: it only lowers the agreement.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ensemble.answers import medoid, similarity

_TIE = 1e-9


@dataclass(frozen=True, slots=True)
class Sample:
    expert: str
    text: str
    answer: str | None
    mean_logprob: float = float("-inf")


@dataclass(frozen=True, slots=True)
class VoteResult:
    winner: int  # index of the winning sample; its own text is the reply
    answer: str | None
    counts: dict[str, int]  # samples per extracted answer
    agreement: float  # (weighted) share of the winning answer; similarity for free text


def _distribution(samples: Sequence[Sample]) -> dict[str | int, float]:
    # A sample without an answer agrees with nobody: it gets a key of its own.
    keys: list[str | int] = [s.answer if s.answer is not None else i for i, s in enumerate(samples)]
    counts = Counter(keys)
    return {k: c / len(samples) for k, c in counts.items()}


def self_confidence(samples: Sequence[Sample]) -> float:
    if len(samples) <= 1:
        return 1.0
    p = _distribution(samples)
    entropy = -sum(q * math.log(q) for q in p.values())
    return max(0.0, 1.0 - entropy / math.log(len(samples)))


def top_share(samples: Sequence[Sample]) -> float:
    """How many of these samples give their most common answer (0 when none has an answer)."""
    answers = [s.answer for s in samples if s.answer is not None]
    if not answers or not samples:
        return 0.0
    return Counter(answers).most_common(1)[0][1] / len(samples)


def consistency_weights(samples: Sequence[Sample], experts: Sequence[str]) -> dict[str, float]:
    """w_m for each of `experts` (the first is the top expert); they sum to 1."""
    by_expert = {e: [s for s in samples if s.expert == e] for e in experts}
    present = [e for e in experts if by_expert[e]]
    if len(present) <= 1:
        return {e: 1.0 if e in present else 0.0 for e in experts}
    dists = {e: _distribution(by_expert[e]) for e in present}
    keys = {k for d in dists.values() for k in d}
    # Answer-less samples have per-expert keys (ints) and so never match across experts.
    ref = {k: sum(d.get(k, 0.0) for d in dists.values()) / len(present) for k in keys}
    raw = {}
    for e in present:
        tv = 0.5 * sum(abs(dists[e].get(k, 0.0) - ref[k]) for k in keys)
        raw[e] = max(self_confidence(by_expert[e]) * (1.0 - tv), 1e-6)
    top = present[0]
    raw[top] = max(raw[top], sum(w for e, w in raw.items() if e != top))
    total = sum(raw.values())
    return {e: raw.get(e, 0.0) / total for e in experts}


def vote(samples: Sequence[Sample], weights: Mapping[str, float] | None = None) -> VoteResult:
    """The majority answer, weighted per expert; ties go to the higher mean token log-probability
    (then to the alphabetically first answer, so the result never depends on sample order)."""
    if not samples:
        raise ValueError("no samples to vote on")
    counts = Counter(s.answer for s in samples if s.answer is not None)
    if not counts:
        texts = [s.text for s in samples]
        central = medoid(texts)
        others = [similarity(texts[central], t) for i, t in enumerate(texts) if i != central]
        agreement = sum(others) / len(others) if others else 1.0
        return VoteResult(central, None, {}, agreement)
    per_expert = Counter(s.expert for s in samples)

    def weight(s: Sample) -> float:
        return 1.0 if weights is None else weights.get(s.expert, 0.0) / per_expert[s.expert]

    score: dict[str, float] = defaultdict(float)
    logprobs: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if s.answer is not None:
            score[s.answer] += weight(s)
            logprobs[s.answer].append(s.mean_logprob)
    total = sum(weight(s) for s in samples)
    best = max(score.values())

    def mean(values: list[float]) -> float:
        return math.fsum(values) / len(values)  # exactly rounded: the same in any order

    tied = [a for a in score if score[a] >= best - _TIE]
    answer = min(tied, key=lambda a: (-mean(logprobs[a]), a))
    winner = max(
        (i for i, s in enumerate(samples) if s.answer == answer),
        key=lambda i: (samples[i].mean_logprob, -i),
    )
    agreement = score[answer] / total if total > 0 else 0.0
    return VoteResult(winner, answer, dict(counts), agreement)
