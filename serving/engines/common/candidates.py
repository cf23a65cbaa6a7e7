"""What every engine's decode session shares (transformers, vLLM, remote): how far it
re-tokenizes and looks ahead, and how it turns pieces of text into renormalised candidates.
No model framework here, so the remote session stays light."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ensemble.types import Candidate

# Tokens re-tokenized on each extend: enough to cover any merge across the join.
TAIL_TOKENS = 8
# A candidate token that is only part of a UTF-8 character is completed greedily, this far.
MAX_BYTE_LOOKAHEAD = 4
REPLACEMENT = "\ufffd"


def renormalised(
    mass: Mapping[str, float], paths: Mapping[str, tuple[int, ...]]
) -> tuple[Candidate, ...]:
    """Pieces of text with their summed probabilities, as candidates renormalised over those
    kept (in `mass`'s order); the piece "" is end-of-sequence. Every engine's session ends its
    `top_k` with this."""
    total = sum(mass.values()) or 1.0
    return tuple(
        Candidate(text, math.log(m / total), paths[text], end=text == "")
        for text, m in mass.items()
    )
