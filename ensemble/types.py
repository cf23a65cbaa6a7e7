"""Plain values that cross the seams between the server, the router, strategies and engines.

They are frozen dataclasses: a request is never mutated after validation (vLLM clones its
SamplingParams for the same reason), and nothing here imports a web or model framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to decode. `temperature == 0` means greedy; `stop` strings never appear in the output.

    None means "the expert's configured default" (for max_tokens: up to its context window).
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token: its text, its log-probability, and the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of one sample's output.

    `index` names the sample (the OpenAI choice). A sample's last chunk has a `finish_reason`.
    `tokens` counts the completion tokens this chunk accounts for, and `prompt_tokens` the prompt
    tokens of `expert` (the same on every chunk of one generation), so a consumer can report usage
    whenever it stops reading. A strategy may send chunks with no text that only account for work
    (samples that lost a vote), and `keepalive` chunks that say it is still working.
    """

    expert: str
    index: int
    text: str
    tokens: int
    prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    keepalive: bool = False


@dataclass(slots=True)
class EnsembleTrace:
    """What a strategy did, filled in as it runs; served as the `chorus` response object.

    `details` holds strategy-specific metadata under its own key (for example `vote`).
    """

    experts: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A possible next piece of text from one expert, with its log-probability.

    `end` marks end-of-sequence (its text is ""). `token_ids` is the expert's own tokens for it.
    """

    text: str
    logprob: float
    token_ids: tuple[int, ...] = ()
    end: bool = False


@dataclass(frozen=True, slots=True)
class NextTokens:
    """An expert's view of the next step: its top candidates (renormalised over those kept), the
    entropy of its whole next-token distribution, and that distribution (log-probabilities over
    its vocabulary) where it was asked for and the engine has it."""

    candidates: tuple[Candidate, ...]
    entropy: float
    distribution: Any = None
