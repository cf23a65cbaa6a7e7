"""vLLM's per-token log-probabilities ({token id: Logprob} per position) as Chorus reads them:
a session's views, and a response's `logprobs`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ensemble.types import TokenLogprob, TopLogprob


def logprob_map(entries: Mapping[int, Any]) -> dict[int, float]:
    """{token id: logprob} from one position of vLLM's logprobs."""
    return {int(token): float(e.logprob) for token, e in entries.items()}


def token_logprobs(token_ids: Any, logprobs: Any, top_logprobs: int) -> list[TokenLogprob]:
    """vLLM's per-token {id: Logprob} maps as TokenLogprobs (its ranks order the alternatives)."""
    out = []
    for token, entries in zip(token_ids, logprobs, strict=False):
        chosen = entries[token]
        ranked: list[tuple[int, Any]] = sorted(
            ((int(e.rank or 0), e) for e in entries.values()), key=lambda pair: pair[0]
        )
        top = tuple(
            TopLogprob(e.decoded_token or "", float(e.logprob))
            for rank, e in ranked
            if 1 <= rank <= top_logprobs
        )
        out.append(TokenLogprob(chosen.decoded_token or "", float(chosen.logprob), top))
    return out
