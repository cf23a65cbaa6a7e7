"""A request's budget (`ensemble.budget`): the worst case of a call, and what each strategy
starts under `max_cost` and `max_fan_out`. Scripted engines, priced by a pricer of fixed
rates: what is checked is which calls are started, with what, and what is reported cut."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web

from ensemble.budget import Budget, Cut, Quote
from ensemble.cascade import CascadeStrategy
from ensemble.engine import Engine
from ensemble.errors import ExpertFailed, OverBudget, RequestRejected
from ensemble.fuse import FusionStrategy
from ensemble.strategy import SingleStrategy, Strategy
from ensemble.types import EnsembleTrace, GenerationChunk, GenerationRequest
from ensemble.vote import VotingStrategy
from router.costs import CostModel
from serving.config import OpenAIExpertConfig
from serving.engines.openai.engine import RemoteOpenAIEngine
from serving.gateway.budgets import ExpertPricer
from tests.conftest import request
from tests.fakes import FakeEngine, ScriptedSamples, ScriptedSessionEngine
from tests.upstream import serve

pytestmark = pytest.mark.anyio

DEFAULT_MAX_TOKENS = 100  # what the rates' quotes say an expert writes when not told


class Rates:
    """A pricer: per expert, a price per prompt token and per completion token."""

    unit = "credits"

    def __init__(self, **rates: tuple[float, float]) -> None:
        self.rates = rates
        self.quoted: list[str] = []

    async def quote(self, expert: Engine, request: GenerationRequest) -> Quote:
        self.quoted.append(expert.name)
        tokens: int = await expert.count_prompt_tokens(request)  # type: ignore[attr-defined]
        prompt, completion = self.rates[expert.name]
        return Quote(tokens, tokens * prompt, completion, DEFAULT_MAX_TOKENS)


def remote(url: str) -> OpenAIExpertConfig:
    return OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model="m", retries=0)


def agreeing(name: str) -> ScriptedSamples:
    return ScriptedSamples(name, [("42", -0.1)])


def disagreeing(name: str) -> ScriptedSamples:
    return ScriptedSamples(name, [("1", -0.1), ("2", -0.2), ("3", -0.3)])


async def collect(
    strategy: Strategy,
    experts: Sequence[Engine],
    budget: Budget,
    trace: EnsembleTrace | None = None,
    **params: Any,
) -> list[GenerationChunk]:
    stream: AsyncGenerator[GenerationChunk, None] = strategy.run(
        request("What is 6 x 7?", **params), experts, trace or EnsembleTrace(), budget
    )
    return [chunk async for chunk in stream]


def cuts(budget: Budget) -> list[tuple[str, str, str, int, int]]:
    return [(c.expert, c.call, c.limit, c.asked, c.kept) for c in budget.skipped]


# -- the worst case of one call ----------------------------------------------------------------


async def test_a_call_is_admitted_only_when_its_worst_case_fits_and_max_tokens_is_pinned() -> None:
    expert = agreeing("a")  # 7 prompt tokens
    rates = Rates(a=(1.0, 0.5))
    # 7 prompt tokens at 1, then 4 completion tokens at 0.5: 9.
    assert (
        await Budget(max_cost=8.99, pricer=rates).admit(
            expert, request("q", max_tokens=4), "answer"
        )
        is None
    )
    budget = Budget(max_cost=9.01, pricer=rates)
    grant = await budget.admit(expert, request("q", max_tokens=4, n=2), "answer")
    assert grant is None  # two choices write up to 8 tokens: 11
    grant = await budget.admit(expert, request("q", max_tokens=4), "answer")
    assert grant is not None and grant.cost == pytest.approx(9.0)
    assert budget.reserved == pytest.approx(9.0) and budget.calls == 1
    # No max_tokens: the expert's default is priced, and pinned so that nothing goes past it.
    roomy = Budget(max_cost=100.0, pricer=rates)
    grant = await roomy.admit(expert, request("q"), "answer")
    assert grant is not None and grant.request.params.max_tokens == DEFAULT_MAX_TOKENS
    assert grant.cost == pytest.approx(7 + DEFAULT_MAX_TOKENS * 0.5)
    roomy.release(grant)
    assert roomy.reserved == 0 and roomy.calls == 1  # a started call still counts as fan-out


async def test_without_limits_everything_is_admitted_as_asked_and_nothing_is_priced() -> None:
    budget = Budget()
    grant = await budget.admit(agreeing("a"), request("q", n=3), "answer", samples=True, trim=True)
    assert grant is not None and grant.request == request("q", n=3) and grant.cost == 0
    assert not budget.limited and budget.skipped == []


# -- single: first choice, fallbacks -----------------------------------------------------------


async def test_single_passes_over_a_routed_expert_that_does_not_fit() -> None:
    dear, cheap = agreeing("dear"), agreeing("cheap")
    budget = Budget(max_cost=5.0, pricer=Rates(dear=(1.0, 1.0), cheap=(0.1, 0.1)))
    trace = EnsembleTrace()
    chunks = await collect(SingleStrategy(), [dear, cheap], budget, trace, max_tokens=4)
    assert "".join(c.text for c in chunks) == "42" and trace.experts == ["cheap"]
    assert dear.calls == [] and cheap.calls[0].params.max_tokens == 4
    assert budget.skipped == [Cut("dear", "answer", "max_cost", 1, 0, 11.0, 5.0)]  # 7 + 4


async def test_a_fallback_that_would_exceed_max_cost_is_not_taken_and_the_error_says_so() -> None:
    early = FakeEngine("early", ["never"], fail_after=0)  # 1 prompt token; fails at once
    dear = agreeing("dear")  # 7 + 4 tokens at 1 each: 11
    rates = Rates(early=(0.1, 0.1), dear=(1.0, 1.0))
    await early.start()
    budget = Budget(max_cost=5.0, pricer=rates)
    with pytest.raises(
        ExpertFailed,
        match=r"the fallback to `dear` was not taken \(it could cost up to 11 credits, more "
        r"than the 5 left of `max_cost`\)",
    ):
        await collect(SingleStrategy(), [early, dear], budget, max_tokens=4)
    assert dear.calls == [] and cuts(budget) == [("dear", "fallback", "max_cost", 1, 0)]
    # The failed call's cost is given back (none of it is reported): 11.2 pays for the fallback,
    # though not for both calls' worst cases (11.5).
    budget = Budget(max_cost=11.2, pricer=rates)
    trace = EnsembleTrace()
    chunks = await collect(SingleStrategy(), [early, dear], budget, trace, max_tokens=4)
    assert "".join(c.text for c in chunks) == "42"
    assert trace.failed == ["early"] and trace.experts == ["dear"] and budget.skipped == []


async def test_nothing_that_fits_is_refused_before_any_model_call() -> None:
    dear, cheap = agreeing("dear"), agreeing("cheap")
    budget = Budget(max_cost=0.5, pricer=Rates(dear=(1.0, 1.0), cheap=(0.1, 0.1)))
    with pytest.raises(OverBudget) as refused:
        await collect(SingleStrategy(), [dear, cheap], budget, max_tokens=4)
    assert refused.value.param == "max_cost"
    # The message names the cheapest call it could have made: cheap's, 0.7 + 0.4.
    assert "the cheapest, to `cheap`, could cost up to 1.1 credits" in refused.value.message
    assert dear.calls == [] and cheap.calls == []


async def test_a_fan_out_cap_of_one_takes_no_fallback_and_prices_nothing() -> None:
    early, good = FakeEngine("early", ["never"], fail_after=0), agreeing("good")
    await early.start()
    budget = Budget(max_fan_out=1)
    with pytest.raises(ExpertFailed, match="`max_fan_out` of 1 calls was used up"):
        await collect(SingleStrategy(), [early, good], budget)
    assert good.calls == [] and cuts(budget) == [("good", "fallback", "max_fan_out", 1, 0)]
    assert budget.skipped[0].worst_case is None


# -- vote: samples, escalation, the early start ------------------------------------------------


async def test_a_vote_keeps_the_samples_that_fit_and_stops_escalating() -> None:
    top, nxt = disagreeing("top"), agreeing("next")
    # Each sample: 4 tokens at 0.1; each prompt 7 tokens at 0.1. Three of top's samples fit.
    max_cost = 0.7 + 3 * 0.4 + 0.05
    budget = Budget(max_cost=max_cost, pricer=Rates(top=(0.1, 0.1), next=(0.1, 0.1)))
    trace = EnsembleTrace()
    await collect(VotingStrategy(samples=5), [top, nxt], budget, trace, max_tokens=4)
    assert top.calls[0].params.n == 3 and top.calls[0].params.max_tokens == 4
    assert nxt.calls == []  # neither started early nor escalated to
    assert trace.vote is not None and not trace.vote.escalated
    assert sum(trace.vote.answers.values()) == 3
    assert cuts(budget) == [
        ("top", "samples", "max_cost", 5, 3),
        ("next", "escalation", "max_cost", 5, 0),
    ]
    assert budget.skipped[0].worst_case == pytest.approx(0.7 + 5 * 0.4)


async def test_an_escalation_takes_the_samples_that_fit() -> None:
    top, nxt = disagreeing("top"), agreeing("next")
    max_cost = (0.7 + 5 * 0.4) + (0.7 + 2 * 0.4) + 0.05  # top's five, then two of next's
    budget = Budget(max_cost=max_cost, pricer=Rates(top=(0.1, 0.1), next=(0.1, 0.1)))
    trace = EnsembleTrace()
    await collect(VotingStrategy(samples=5), [top, nxt], budget, trace, max_tokens=4)
    assert [c.params.n for c in top.calls] == [5] and [c.params.n for c in nxt.calls] == [2]
    assert trace.vote is not None and trace.vote.escalated
    assert cuts(budget) == [("next", "samples", "max_cost", 5, 2)]


async def test_the_next_expert_samples_early_only_when_all_its_samples_fit_and_is_given_back() -> (
    None
):
    top, nxt = agreeing("top"), agreeing("next")
    budget = Budget(max_cost=100.0, pricer=Rates(top=(0.1, 0.1), next=(0.1, 0.1)))
    await collect(VotingStrategy(samples=5), [top, nxt], budget, max_tokens=4)
    # Both started (ten calls of the fan-out); next was not needed: its cost is given back.
    assert budget.calls == 10 and budget.reserved == pytest.approx(0.7 + 5 * 0.4)
    assert budget.skipped == []


async def test_a_fan_out_cap_trims_the_escalation() -> None:
    top, nxt = disagreeing("top"), agreeing("next")
    budget = Budget(max_fan_out=7)
    trace = EnsembleTrace()
    await collect(VotingStrategy(samples=5), [top, nxt], budget, trace)
    assert [c.params.n for c in nxt.calls] == [2] and budget.calls == 7
    assert cuts(budget) == [("next", "samples", "max_fan_out", 5, 2)]


# -- fuse and cascade: the experts that decode together ----------------------------------------


async def test_fusion_leaves_out_the_experts_that_do_not_fit_in_routing_order() -> None:
    s1, s2, s3 = (ScriptedSessionEngine(n, "hi") for n in ("s1", "s2", "s3"))
    # Sessions' prompts: 3 tokens each at 0.1. Answer: 8 tokens at the dearest rate.
    # s1 alone 1.1; s1 + s2 8.6; s1 + s3 1.4.
    rates = Rates(s1=(0.1, 0.1), s2=(0.1, 1.0), s3=(0.1, 0.1))
    budget = Budget(max_cost=2.0, pricer=rates)
    trace = EnsembleTrace()
    chunks = await collect(FusionStrategy(max_tokens=8), [s1, s2, s3], budget, trace)
    assert "".join(c.text for c in chunks) == "hi"
    assert len(s1.sessions) == 1 and s2.sessions == [] and len(s3.sessions) == 1
    assert trace.fusion is not None and set(trace.fusion.share) == {"s1", "s3"}
    assert cuts(budget) == [("s2", "fan-out", "max_cost", 1, 0)]
    assert budget.reserved == pytest.approx(1.4)
    with pytest.raises(OverBudget):
        await collect(
            FusionStrategy(max_tokens=8), [s1, s2, s3], Budget(max_cost=1.0, pricer=rates)
        )


async def test_a_cascade_runs_the_strong_expert_alone_or_the_draft_alone() -> None:
    strong, draft = ScriptedSessionEngine("strong", "hi"), ScriptedSessionEngine("draft", "ho")
    rates = Rates(strong=(0.1, 1.0), draft=(0.1, 0.1))
    cascade = CascadeStrategy(draft="draft", max_tokens=8)
    # Strong alone: 0.3 + 8; with the draft: 0.6 + 8.
    trace = EnsembleTrace()
    await collect(cascade, [strong, draft], Budget(max_cost=8.4, pricer=rates), trace)
    assert len(strong.sessions) == 1 and draft.sessions == []
    assert trace.cascade is not None and trace.cascade.share == {"strong": 1.0}
    # The strong one alone does not fit 1.5; the draft alone does (0.3 + 0.8).
    trace = EnsembleTrace()
    chunks = await collect(cascade, [strong, draft], Budget(max_cost=1.5, pricer=rates), trace)
    assert "".join(c.text for c in chunks) == "ho" and len(strong.sessions) == 1
    assert trace.experts == ["draft"]


async def test_a_fan_out_cap_keeps_the_first_experts_of_a_fusion() -> None:
    s1, s2, s3 = (ScriptedSessionEngine(n, "hi") for n in ("s1", "s2", "s3"))
    budget = Budget(max_fan_out=2)
    await collect(FusionStrategy(max_tokens=8), [s1, s2, s3], budget)
    assert s3.sessions == [] and cuts(budget) == [("s3", "fan-out", "max_fan_out", 1, 0)]


async def test_an_expert_that_fails_while_it_is_priced_is_a_failed_expert() -> None:
    class Unreachable(FakeEngine):
        async def count_prompt_tokens(self, request: GenerationRequest) -> int:  # noqa: ARG002
            raise ExpertFailed(f"expert {self.name} failed: unreachable")

    gone, good = Unreachable("gone", ["x"]), agreeing("good")
    await gone.start()
    rates = Rates(gone=(0.1, 0.1), good=(0.1, 0.1))
    for strategy in (SingleStrategy(), VotingStrategy(samples=3)):
        trace = EnsembleTrace()
        budget = Budget(max_cost=100.0, pricer=rates)
        chunks = await collect(strategy, [gone, good], budget, trace, max_tokens=4)
        assert "".join(c.text for c in chunks) == "42"
        assert trace.failed == ["gone"] and trace.experts == ["good"]

    class UnreachableSessions(ScriptedSessionEngine):
        async def count_prompt_tokens(self, request: GenerationRequest) -> int:  # noqa: ARG002
            raise ExpertFailed(f"expert {self.name} failed: unreachable")

    s1, s2 = UnreachableSessions("s1", "hi"), ScriptedSessionEngine("s2", "hi")
    trace = EnsembleTrace()
    budget = Budget(max_cost=100.0, pricer=Rates(s1=(0.1, 0.1), s2=(0.1, 0.1)))
    await collect(FusionStrategy(max_tokens=8), [s1, s2], budget, trace)
    assert trace.failed == ["s1"] and trace.experts == ["s2"] and s1.sessions == []


# -- the openai engine counts through the server's /tokenize -----------------------------------


async def test_a_remote_expert_counts_its_prompt_with_the_servers_tokenize() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def upstream(tokenizes: bool) -> Any:
        async def handler(http: web.Request) -> web.StreamResponse:
            if http.method == "GET":  # the health probe
                return web.json_response({"data": []})
            seen.append((http.path, await http.json()))
            if http.path == "/tokenize" and tokenizes:
                return web.json_response({"tokens": list(range(11)), "count": 11})
            return web.json_response({"error": {"message": "Not Found"}}, status=404)

        return handler

    tools = ({"type": "function", "function": {"name": "f", "parameters": {}}},)
    asked = replace(request("hello"), tools=tools, tool_choice="auto")
    async with serve(upstream(True)) as vllm_url, serve(upstream(False)) as other_url:
        vllm = RemoteOpenAIEngine("vllm", remote(vllm_url))
        other = RemoteOpenAIEngine("other", remote(other_url))
        for engine in (vllm, other):
            await engine.start()
        try:
            assert await vllm.count_prompt_tokens(asked) == 11
            assert await other.count_prompt_tokens(asked) is None  # not a vLLM server
        finally:
            for engine in (vllm, other):
                await engine.aclose()
    path, body = seen[0]
    assert path == "/tokenize" and body["add_generation_prompt"] is True
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["tools"] == list(tools)  # rendered into the prompt, so counted too


async def test_the_gateways_quote_is_the_accountings_cost_model_and_the_engines_default() -> None:
    costs = {"a": CostModel("credits", 0.5, 2.0), "b": CostModel("credits", 0.5, 2.0)}
    pricer = ExpertPricer("credits", costs, {"a": 256, "b": None})
    engine = agreeing("a")  # 7 prompt tokens, a window of 1024
    quote = await pricer.quote(engine, request("q"))
    assert quote == Quote(7, 3.5, 2.0, 256)
    # No configured default: up to the context window, as the engines do.
    assert (await pricer.quote(agreeing("b"), request("q"))).default_max_tokens == 1024 - 7

    class Uncounted(FakeEngine):
        async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:  # type: ignore[override]  # noqa: ARG002
            return None

    with pytest.raises(RequestRejected, match="cannot count a prompt's tokens") as refused:
        await pricer.quote(Uncounted("a", ["x"]), request("q"))
    assert refused.value.param == "max_cost"
