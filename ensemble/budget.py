"""A request's budget: what its strategy may still start.

Two limits, either optional: `max_cost` (the client's, in the pool's cost unit) and `max_fan_out`
(the pool's, in model calls). Before each model call a strategy asks the budget. With
`max_cost`, the budget prices the call's worst case: its prompt tokens as the expert counts
them and every completion token it may write (its `max_tokens`, pinned on the request it
admits), at the expert's prices, the accounting's own cost model. A call is started only if
that fits what is left, so the cost a response reports never exceeds `max_cost`. Whatever a
limit cut (a fallback, an escalation, some of a vote's samples, an expert of a fusion) is
recorded in `skipped`, for the response's `chorus.budget`.

Fan-out counts model calls: a generation (whatever its `n`: those are the client's choices) or
a decode session counts one; a vote's samples count one each. A call counts once started, even
if it fails or is cancelled; its cost is given back then, since its tokens are never reported.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

from ensemble.engine import Engine
from ensemble.errors import ExpertFailed, OverBudget
from ensemble.types import GenerationRequest

CallKind = Literal["answer", "fallback", "escalation", "samples", "fan-out"]
Limit = Literal["max_cost", "max_fan_out"]
E = TypeVar("E", bound=Engine)

# Worst cases are compared a hair high, so that float rounding in the accounting's own sums
# cannot take a reported cost past `max_cost`.
_MARGIN = 1 + 1e-9


@dataclass(frozen=True, slots=True)
class Quote:
    """What one call to an expert may cost: its prompt (counted by its tokenizer, priced), one
    completion token, and the completion tokens it writes per sequence when a request sets no
    `max_tokens` (its default, within its context window)."""

    prompt_tokens: int
    prompt_cost: float
    per_token: float
    default_max_tokens: int

    def max_tokens(self, asked: int | None) -> int:
        return asked or self.default_max_tokens

    def cost(self, sequences: int, max_tokens: int | None) -> float:
        return self.prompt_cost + sequences * self.max_tokens(max_tokens) * self.per_token


class Pricer(Protocol):
    """Quotes calls in one cost unit (the gateway's, from the experts' cost models)."""

    unit: str

    async def quote(self, expert: Engine, request: GenerationRequest) -> Quote: ...


@dataclass(frozen=True, slots=True)
class Cut:
    """A call a limit kept from starting, or trimmed."""

    expert: str
    call: CallKind
    limit: Limit
    asked: int  # model calls asked for: a vote's samples, else 1
    kept: int  # of those, started (0: none)
    worst_case: float | None  # what the calls asked for could have cost; None: not priced
    left: float | None  # of `max_cost`, when it was cut; None: not priced

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Grant:
    """A call the budget admitted: the request to send (its `max_tokens` what was priced, its
    samples perhaps trimmed) and the cost reserved for it."""

    request: GenerationRequest
    cost: float


class Budget:
    """One request's limits and what was started against them. With neither limit it admits
    everything as asked (and prices nothing)."""

    def __init__(
        self,
        *,
        max_cost: float | None = None,
        max_fan_out: int | None = None,
        pricer: Pricer | None = None,
    ) -> None:
        if max_cost is not None and pricer is None:
            raise ValueError("a budget with `max_cost` needs a pricer")
        self.max_cost = max_cost
        self.max_fan_out = max_fan_out
        self.pricer = pricer
        self.reserved = 0.0  # worst cases of the calls started and not given back
        self.calls = 0  # model calls started
        self.skipped: list[Cut] = []
        self._cheapest: tuple[str, int, int, float] | None = None  # the cheapest call refused

    @property
    def limited(self) -> bool:
        return self.max_cost is not None or self.max_fan_out is not None

    @property
    def cost_left(self) -> float:
        return math.inf if self.max_cost is None else self.max_cost - self.reserved

    @property
    def calls_left(self) -> float:
        return math.inf if self.max_fan_out is None else self.max_fan_out - self.calls

    def next_prompt(self) -> None:
        """A list of raw prompts is answered prompt by prompt: the fan-out cap holds for each."""
        self.calls = 0

    async def _quote(self, expert: Engine, request: GenerationRequest) -> Quote | None:
        if self.pricer is None or self.max_cost is None:
            return None
        return await self.pricer.quote(expert, request)

    async def admit(
        self,
        expert: Engine,
        request: GenerationRequest,
        call: CallKind,
        *,
        samples: bool = False,
        trim: bool = False,
        record: bool = True,
    ) -> Grant | None:
        """Admit one generation of `request` by `expert`, or None (recorded as a cut unless
        `record` is False). With `samples`, its `n` sequences are a vote's samples, each a call
        of the fan-out, and with `trim` as many as fit are admitted (at least one)."""
        params = request.params
        wanted = params.n
        quote = await self._quote(expert, request)
        kept, limit = self._fit(quote, params.max_tokens, wanted, samples=samples)
        if kept < wanted and not trim:
            kept = 0
        if kept == 0:
            least = 1 if trim else wanted  # the smallest call that would have done
            if record:
                self._cut(
                    expert.name,
                    call,
                    limit,
                    wanted if samples else 1,
                    0,
                    quote,
                    wanted,
                    params.max_tokens,
                )
            if quote is not None:
                self._remember(expert.name, quote, least, params.max_tokens)
            return None
        if kept < wanted:
            self._cut(expert.name, "samples", limit, wanted, kept, quote, wanted, params.max_tokens)
        params = replace(params, n=kept)
        cost = 0.0
        if quote is not None:
            cost = quote.cost(kept, params.max_tokens)
            # Pinned, so that no default the engine or its server applies can go past it.
            params = replace(params, max_tokens=quote.max_tokens(params.max_tokens) or None)
        self.reserved += cost
        self.calls += kept if samples else 1
        return Grant(replace(request, params=params), cost)

    def _fit(
        self, quote: Quote | None, max_tokens: int | None, wanted: int, *, samples: bool
    ) -> tuple[int, Limit]:
        """How many of the `wanted` sequences fit (samples may fit in part, a client's choices
        all or none), and the limit that bound them."""
        calls_left = self.calls_left
        whole = wanted if calls_left >= 1 else 0  # a call counts one, whatever its `n`
        by_calls = int(min(wanted, calls_left)) if samples else whole
        by_cost = wanted
        if quote is not None:
            left = self.cost_left / _MARGIN
            per_sequence = quote.max_tokens(max_tokens) * quote.per_token
            if quote.prompt_cost > left:
                by_cost = 0
            elif samples and per_sequence > 0:
                by_cost = min(wanted, int((left - quote.prompt_cost) // per_sequence))
            elif quote.cost(wanted, max_tokens) > left:
                by_cost = 0
        kept = max(0, min(by_calls, by_cost))
        return kept, "max_cost" if by_cost < by_calls else "max_fan_out"

    async def admit_group(
        self, experts: Sequence[E], request: GenerationRequest, max_tokens: int
    ) -> tuple[list[E], list[str]]:
        """The experts (in order) whose decode sessions may decode one answer together (fuse,
        cascade), and those that failed while being priced. Those that do not fit are left
        out, recorded as cuts. Their worst case is every session's prompt, priced, and
        `max_tokens` answer tokens at the dearest of them (each step's token is billed to the
        expert leading then). None fits: `OverBudget` (or the first failure, if any failed)."""
        quotes: list[Quote | BaseException | None] = [None] * len(experts)
        if self.max_cost is not None:
            quotes = await asyncio.gather(
                *(self._quote(e, request) for e in experts), return_exceptions=True
            )
        kept: list[E] = []
        failed: dict[str, ExpertFailed] = {}
        prompts, dearest, worst = 0.0, 0.0, 0.0
        for expert, quote in zip(experts, quotes, strict=True):
            if isinstance(quote, ExpertFailed):
                failed[expert.name] = quote
                continue
            if isinstance(quote, BaseException):
                raise quote
            if self.calls_left < len(kept) + 1:
                self._cut(expert.name, "fan-out", "max_fan_out", 1, 0, quote, 1, max_tokens)
                continue
            if quote is not None:
                rate = max(dearest, quote.per_token)
                cost = prompts + quote.prompt_cost + max_tokens * rate
                if cost > self.cost_left / _MARGIN:
                    self._cut(expert.name, "fan-out", "max_cost", 1, 0, quote, 1, max_tokens)
                    self._remember(expert.name, quote, 1, max_tokens)
                    continue
                prompts, dearest, worst = prompts + quote.prompt_cost, rate, cost
            kept.append(expert)
        if not kept:
            raise next(iter(failed.values())) if failed else self.refusal()
        self.reserved += worst
        self.calls += len(kept)
        return kept, list(failed)

    def release(self, grant: Grant) -> None:
        """A call that failed, or was cancelled, before its tokens were accounted for: its cost
        is free again (it still counts against `max_fan_out`: it was started)."""
        self.reserved -= grant.cost

    def _cut(
        self,
        expert: str,
        call: CallKind,
        limit: Limit,
        asked: int,
        kept: int,
        quote: Quote | None,
        sequences: int,
        max_tokens: int | None,
    ) -> None:
        """Record a cut; its worst case is that of `sequences` answers of up to `max_tokens`."""
        worst = None if quote is None else quote.cost(sequences, max_tokens)
        left = None if self.max_cost is None else max(self.cost_left, 0.0)
        self.skipped.append(Cut(expert, call, limit, asked, kept, worst, left))

    def _remember(self, expert: str, quote: Quote, sequences: int, max_tokens: int | None) -> None:
        """Keep the cheapest call refused for cost, for the message of `refusal`."""
        tokens = sequences * quote.max_tokens(max_tokens)
        worst = quote.cost(sequences, max_tokens)
        if self._cheapest is None or worst < self._cheapest[3]:
            self._cheapest = (expert, quote.prompt_tokens, tokens, worst)

    def refusal(self) -> OverBudget:
        """The 400 for a request none of whose calls fits: raised before any model call."""
        unit = self.pricer.unit if self.pricer is not None else ""
        message = f"`max_cost` {self.max_cost:g} {unit} cannot pay for any call this request needs"
        if self._cheapest is not None:
            expert, prompt_tokens, tokens, worst = self._cheapest
            message += (
                f": the cheapest, to `{expert}`, could cost up to {worst:.6g} {unit} "
                f"({prompt_tokens} prompt tokens and up to {tokens} completion tokens); "
                "raise `max_cost` or lower `max_tokens`"
            )
        return OverBudget(message, param="max_cost")

    def explain(self, failure: ExpertFailed) -> ExpertFailed:
        """`failure`, saying which fallbacks a limit kept from being tried."""
        fallbacks = [c for c in self.skipped if c.call == "fallback"]
        if not fallbacks:
            return failure
        notes = "; ".join(
            f"the fallback to `{c.expert}` was not taken ({self._why(c)})" for c in fallbacks
        )
        return type(failure)(f"{failure.message}; {notes}", param=failure.param)

    def _why(self, cut: Cut) -> str:
        if cut.limit == "max_fan_out":
            return f"the pool's `max_fan_out` of {self.max_fan_out} calls was used up"
        unit = self.pricer.unit if self.pricer is not None else ""
        return (
            f"it could cost up to {cut.worst_case:.6g} {unit}, more than the "
            f"{cut.left:.6g} left of `max_cost`"
        )

    def as_json(self, spent: float | None) -> dict[str, Any]:
        """The response's `chorus.budget`: the limits, what was spent and started, what was
        cut."""
        return {
            "max_cost": self.max_cost,
            "spent": spent,
            "max_fan_out": self.max_fan_out,
            "calls": self.calls,
            "skipped": [c.as_json() for c in self.skipped],
        }
