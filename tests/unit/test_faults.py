"""Failing and stalling experts: timeouts, fallbacks, and ensembles carrying on without them.

Scripted engines stand in for the experts here (the logic under test is the strategies'); the
same faults against real servers are in tests/integration/test_faults.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import replace

import pytest

from ensemble.cascade import CascadeStrategy
from ensemble.engine import Engine
from ensemble.errors import ExpertFailed, ExpertTimedOut
from ensemble.fuse import FusionStrategy
from ensemble.strategy import SingleStrategy, Strategy
from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
)
from ensemble.vote import VotingStrategy
from serving.engines.common.supervised import supervise
from tests.fakes import FakeEngine, ScriptedSamples, ScriptedSessionEngine

pytestmark = pytest.mark.anyio

REQUEST = GenerationRequest("r", (ChatMessage("user", "hi"),), SamplingParams(temperature=0.0))


async def collect(stream: object) -> list[GenerationChunk]:
    return [chunk async for chunk in stream]  # type: ignore[attr-defined]


async def run(
    strategy: Strategy, experts: Sequence[Engine]
) -> tuple[str, EnsembleTrace, list[GenerationChunk]]:
    trace = EnsembleTrace()
    chunks = await collect(strategy.run(REQUEST, experts, trace))
    return "".join(c.text for c in chunks), trace, chunks


# -- per-expert timeouts ----------------------------------------------------------------------


async def test_an_expert_that_never_starts_times_out_and_its_work_stops() -> None:
    inner = FakeEngine("slow", ["a", "b"], stall_after=0)
    engine = supervise(inner, first_token_timeout_s=0.2, token_timeout_s=5)
    with pytest.raises(ExpertTimedOut, match="slow timed out"):
        await collect(engine.generate(REQUEST))
    assert inner.active == 0


async def test_an_expert_that_stalls_mid_answer_is_cut_off() -> None:
    inner = FakeEngine("stalls", ["a", "b", "c"], stall_after=2)
    engine = supervise(inner, first_token_timeout_s=5, token_timeout_s=0.2)
    got: list[str] = []
    with pytest.raises(ExpertTimedOut):
        async for chunk in engine.generate(REQUEST):
            got.append(chunk.text)
    assert got == ["a", "b"]
    assert inner.active == 0


async def test_a_slow_but_steady_expert_is_not_cut() -> None:
    engine = supervise(ScriptedSamples("steady", [("x", -0.1)], delay_s=0.1), 1.0, 0.3)
    chunks = await collect(engine.generate(REQUEST))
    assert [c.text for c in chunks] == ["x"]


# -- single -------------------------------------------------------------------------------------


async def test_single_falls_back_when_the_top_expert_stalls_before_answering() -> None:
    stalled = supervise(FakeEngine("a", ["never"], stall_after=0), 0.2, 0.2)
    text, trace, _ = await run(SingleStrategy(), [stalled, FakeEngine("b", ["ok", "!"])])
    assert text == "ok!"
    assert trace.experts == ["b"]
    assert trace.failed == ["a"]


# -- vote ---------------------------------------------------------------------------------------


def voting(**kwargs: object) -> VotingStrategy:
    return VotingStrategy(samples=3, keepalive_s=0.05, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("concurrent", [True, False])
async def test_vote_takes_the_next_expert_when_the_top_one_fails(concurrent: bool) -> None:
    good = ScriptedSamples("good", [("The answer is 4", -0.1)])
    text, trace, _ = await run(
        voting(concurrent=concurrent), [FakeEngine("bad", ["x"], fail_after=0), good]
    )
    assert text == "The answer is 4"
    assert trace.experts == ["good"]
    assert trace.failed == ["bad"]
    assert trace.vote is not None and trace.vote.escalated is False


async def test_vote_keeps_the_top_experts_answer_when_the_escalation_fails() -> None:
    torn = ScriptedSamples("torn", [("4", -0.1), ("5", -0.2), ("6", -0.3)])  # agreement 1/3
    stalled = supervise(FakeEngine("stalled", ["x"], stall_after=0), 0.2, 0.2)
    text, trace, _ = await run(voting(), [torn, stalled])
    assert text == "4"
    assert trace.experts == ["torn"]
    assert trace.failed == ["stalled"]


async def test_vote_escalates_past_a_failed_expert_to_the_one_after() -> None:
    torn = ScriptedSamples("torn", [("4", -0.1), ("5", -0.2), ("6", -0.3)])
    sure = ScriptedSamples("sure", [("5", -0.1)])
    text, trace, _ = await run(voting(), [torn, FakeEngine("bad", ["x"], fail_after=0), sure])
    assert text == "5"
    assert trace.experts == ["torn", "sure"]
    assert trace.failed == ["bad"]


async def test_vote_fails_before_any_byte_when_every_expert_fails() -> None:
    trace = EnsembleTrace()
    stream = voting().run(
        REQUEST,
        [FakeEngine("a", ["x"], fail_after=0), FakeEngine("b", ["y"], fail_after=0)],
        trace,
    )
    with pytest.raises(ExpertFailed, match="expert b failed"):
        await anext(stream)


# -- fuse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", [0, 1])
async def test_fuse_carries_on_when_an_expert_fails_mid_answer(failing: int) -> None:
    experts = [
        ScriptedSessionEngine("a", "hello", fail_at=2 if failing == 0 else None),
        ScriptedSessionEngine("b", "hello", fail_at=2 if failing == 1 else None),
    ]
    text, trace, _ = await run(FusionStrategy(), experts)
    assert text == "hello"  # the survivor caught up on the text chosen before the failure
    assert trace.failed == [experts[failing].name]
    assert set(trace.experts) == {"a", "b"}
    assert all(s.closed for e in experts for s in e.sessions)


async def test_fuse_drops_an_expert_that_stalls_and_one_that_cannot_open() -> None:
    stalls = supervise(ScriptedSessionEngine("stalls", "hello", stall_at=1), 1.0, 0.2)
    text, trace, _ = await run(
        FusionStrategy(),
        [
            ScriptedSessionEngine("a", "hello"),
            stalls,
            ScriptedSessionEngine("closed", "hello", fail_open=True),
        ],
    )
    assert text == "hello"
    assert sorted(trace.failed) == ["closed", "stalls"]


async def test_fuse_fails_with_the_experts_error_when_none_is_left() -> None:
    experts = [
        ScriptedSessionEngine("a", "hello", fail_at=1),
        ScriptedSessionEngine("b", "hello", fail_at=1),
    ]
    with pytest.raises(ExpertFailed, match="scripted"):
        await run(FusionStrategy(), experts)


async def test_a_stalled_session_call_is_abandoned_promptly() -> None:
    stalls = supervise(ScriptedSessionEngine("stalls", "hi", stall_at=0), 0.2, 0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ExpertTimedOut):
        await run(FusionStrategy(), [stalls])
    assert asyncio.get_running_loop().time() - started < 2


# -- cascade ------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["strong", "draft"])
async def test_cascade_carries_on_with_the_expert_left(failing: str) -> None:
    strong = ScriptedSessionEngine("strong", "hello", fail_at=1 if failing == "strong" else None)
    draft = ScriptedSessionEngine("draft", "hello", fail_at=2 if failing == "draft" else None)
    # threshold 0: every step escalates to the strong expert while there is one
    text, trace, _ = await run(CascadeStrategy(draft="draft", threshold=0.0), [strong, draft])
    assert text == "hello"
    assert trace.failed == [failing]


@pytest.mark.parametrize("strategy", [FusionStrategy(), CascadeStrategy()])
async def test_a_negative_seed_samples_and_every_session_is_closed(strategy: Strategy) -> None:
    experts = [ScriptedSessionEngine("a", "hello"), ScriptedSessionEngine("b", "hello")]
    request = GenerationRequest(
        "r", (ChatMessage("user", "hi"),), SamplingParams(temperature=1.0, seed=-7)
    )
    chunks = await collect(strategy.run(request, experts, EnsembleTrace()))
    assert "".join(c.text for c in chunks)
    assert all(s.closed for e in experts for s in e.sessions)


async def _fused_chunks(strategy: Strategy, top_logprobs: int) -> list[GenerationChunk]:
    experts: list[Engine] = [ScriptedSessionEngine("a", "hi"), ScriptedSessionEngine("b", "ho")]
    params = SamplingParams(max_tokens=8, logprobs=True, top_logprobs=top_logprobs)
    request = GenerationRequest("r", (ChatMessage("user", "q"),), params)
    return await collect(strategy.run(request, experts, EnsembleTrace()))


@pytest.mark.parametrize("strategy", [FusionStrategy(), CascadeStrategy(threshold=0.0)])
async def test_token_level_pools_report_the_distribution_each_piece_was_chosen_from(
    strategy: Strategy,
) -> None:
    chunks = await _fused_chunks(strategy, top_logprobs=2)
    steps = [lp for c in chunks for lp in c.logprobs]
    assert "".join(lp.token for lp in steps) == "".join(c.text for c in chunks) == "hi"
    assert steps[-1].token == ""  # the end of the answer was chosen too
    for step in steps[:-1]:
        assert len(step.top) == 2
        assert [t.logprob for t in step.top] == sorted((t.logprob for t in step.top), reverse=True)
        assert sum(math.exp(t.logprob) for t in step.top) <= 1 + 1e-9
    if isinstance(strategy, FusionStrategy):
        # Both experts agree on "h" (0.9 each): fused 0.9; at the second piece they disagree
        # ("i" against "o"), so neither reaches 0.9 and the primary's "i" wins the tie.
        assert math.isclose(math.exp(steps[0].logprob), 0.9, rel_tol=1e-6)
        assert steps[1].token == "i" and math.exp(steps[1].logprob) < 0.9


@pytest.mark.parametrize(("fmt", "answer"), [("number", "12"), ("short", "13")])
async def test_a_request_chooses_what_a_vote_reads_out_of_the_samples(
    fmt: str, answer: str
) -> None:
    replies = [("12 apples", -0.3), ("12 apples", -0.3), ("12", -0.1), ("13", -0.2), ("13", -0.2)]
    expert = ScriptedSamples("e", replies)
    request = replace(REQUEST, answer_format=fmt)
    trace = EnsembleTrace()
    await collect(VotingStrategy(samples=5, escalate_below=0.0).run(request, [expert], trace))
    assert trace.vote is not None and trace.vote.answer == answer
