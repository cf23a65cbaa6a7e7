"""The one entropy estimator of every engine's decode sessions (what cascades compare to their
`threshold`).

vLLM, in process or behind `vllm serve`, reports only the top log-probabilities of a step, so
`NextTokens.entropy` is estimated from a top-L view, and every engine estimates it the same way
from the same L, so that one cascade `threshold` means one thing whichever engine runs the draft
expert: the transformers session, which holds the whole distribution, uses this estimate too
rather than the exact entropy (a threshold tuned on transformers holds when the expert moves to
vLLM, and the other way round).

What it computes, from the top L = `ENTROPY_TOP` log-probabilities of one step: with kept
probabilities p_1 >= ... >= p_L and leftover mass r = 1 - sum(p),

    H ~= -sum(p_i log p_i) - r log min(p_L, r)

Every token outside the top L has probability at most p_L, and at most r, so its share -q log q
of the entropy is at least -q log min(p_L, r): the estimate is the entropy of the kept part
exactly, plus the leftover spread over tokens as likely as the least likely kept one (or lumped
into one outcome, when r is smaller than p_L). It is a lower bound on the true entropy, exact when
the top L hold all the mass (r = 0), close to it on peaked steps and short of it on flat ones (how
far, against the exact entropy: loadtest/RESULTS.md, the `openai` engine's decode sessions).

What a cascade threshold t (nats) then means: the draft expert's estimated entropy above t. As the
estimate never exceeds the true entropy, a step counted as unsure is one whose true entropy is
above t too; a step whose true entropy is above t but whose top L hold most of the mass may be
counted as sure. An engine that gives fewer than L entries (vLLM with `max_logprobs` under 20, a
server started with a smaller `--max-logprobs`) gives a lower estimate.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

ENTROPY_TOP = 20  # L: vLLM's default `max_logprobs` (and `vllm serve --max-logprobs`)
_IMPOSSIBLE = -9999.0  # vLLM's JSON stands in this for a log-probability of -inf


def estimated_entropy(logprobs: Iterable[float]) -> float:
    """The entropy estimate (nats) from one step's log-probabilities: of those given, the top
    `ENTROPY_TOP` count (see the module docstring); none: 0."""
    top = heapq.nlargest(ENTROPY_TOP, (lp for lp in logprobs if lp > _IMPOSSIBLE))
    probs = [math.exp(lp) for lp in top]
    if not probs:
        return 0.0
    kept = -sum(p * math.log(p) for p in probs if p > 0)
    rest = max(0.0, 1.0 - sum(probs))
    bound = min(probs[-1], rest)
    return kept + (rest * -math.log(bound) if bound > 0 else 0.0)
