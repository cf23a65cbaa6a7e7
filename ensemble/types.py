"""Plain values that cross the seams between the server, the router, strategies and engines.

They are frozen dataclasses: a request is never mutated after validation (vLLM clones its
SamplingParams for the same reason), and nothing here imports a web or model framework.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call an assistant made: its id, the function's name, its arguments (JSON
    text, as OpenAI sends them)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str | None = None  # a `tool` message: the call it answers


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
    """What one expert is asked to generate: a chat (`messages`, rendered with the expert's chat
    template) or, for the legacy completions API, a raw `prompt` sent to the model as it is."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    answer_format: str | None = None
    """How a vote reads the answer out of a reply (`ensemble.answers`); None: the pool's."""
    prompt: str | None = None
    """A raw prompt (no chat template, no expert `stop`); when set, `messages` is empty."""
    tools: tuple[dict[str, Any], ...] = ()
    """OpenAI tool objects as sent (`{"type": "function", "function": {...}}`), validated."""
    tool_choice: str | dict[str, Any] = "auto"
    """"none", "auto", "required" or `{"type": "function", "function": {"name": ...}}`."""
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    """`json_object` or `json_schema` (validated); None: free text."""

    @property
    def prompt_param(self) -> str:
        """The request field a problem with the prompt names: `prompt` or `messages`."""
        return "messages" if self.prompt is None else "prompt"

    @property
    def calls_tools(self) -> bool:
        """Tool calls are read out of the output (the model may, or must, call a tool)."""
        return bool(self.tools) and self.tool_choice != "none"


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
class Piece:
    """A stretch of streamed text and the expert that chose it, with the weights each expert
    had in that choice (token-level strategies; {expert: 1.0} where one expert decided)."""

    text: str
    expert: str
    weights: dict[str, float]


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of one sample's output.

    `index` names the sample (the OpenAI choice). A sample's last chunk has a `finish_reason`.
    `tokens` counts the completion tokens this chunk accounts for, and `prompt_tokens` the prompt
    tokens of `expert` (the same on every chunk of one generation), so a consumer can report usage
    whenever it stops reading. A strategy may send chunks with no text that only account for work
    (samples that lost a vote), and `keepalive` chunks that say it is still working.

    `pieces`, from token-level strategies, split `text` by the expert that chose each stretch
    (their texts join to `text`); empty where `expert` produced all of it. `token_ids` are the
    expert's tokens behind `text` where its engine gives them (vLLM: some of its tool parsers
    look for special tokens); empty otherwise.
    """

    expert: str
    index: int
    text: str
    tokens: int
    prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    keepalive: bool = False
    pieces: tuple[Piece, ...] = ()
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class VoteSummary:
    """How a vote went: answers counted, the winner, its weighted share, whether it escalated."""

    answers: dict[str, int]
    answer: str | None
    agreement: float
    escalated: bool


@dataclass(frozen=True, slots=True)
class FusionSummary:
    """How a fusion went: its weighting, steps taken, each expert's share of the chosen pieces,
    the share of steps the primary decided alone, the share of the primary's drafted pieces that
    were chosen as drafted, and the mean pieces drafted per round (both None without speculative
    rounds)."""

    weighting: str
    steps: int
    share: dict[str, float]
    gate_skip_rate: float
    draft_acceptance: float | None = None
    draft_length: float | None = None


@dataclass(frozen=True, slots=True)
class CascadeSummary:
    """How a cascade went: its draft expert, steps taken, each expert's share of the pieces, and
    the share of drafted pieces chosen as drafted and the mean pieces drafted per round (both
    None without speculative rounds)."""

    draft: str
    steps: int
    share: dict[str, float]
    draft_acceptance: float | None = None
    draft_length: float | None = None


@dataclass(slots=True)
class EnsembleTrace:
    """What a strategy did, filled in as it runs; served as the `chorus` response object.

    `experts` and `weights` are final once the strategy's stream has ended (token-level
    strategies fill them as they close). `failed` lists experts left out after failing.
    """

    experts: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    vote: VoteSummary | None = None
    fusion: FusionSummary | None = None
    cascade: CascadeSummary | None = None

    def summaries(self) -> dict[str, Any]:
        """The strategy-specific keys of the `chorus` object (absent when empty)."""
        out: dict[str, Any] = {"failed": list(self.failed)} if self.failed else {}
        for key in ("vote", "fusion", "cascade"):
            summary = getattr(self, key)
            if summary is not None:
                out[key] = asdict(summary)
        return out


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
    entropy of its whole next-token distribution as every engine estimates it from its top 20
    log-probabilities (a lower bound; `serving.engines.common.entropy`), and that distribution
    (log-probabilities over its vocabulary) where it was asked for and the engine has it."""

    candidates: tuple[Candidate, ...]
    entropy: float
    distribution: Any = None
