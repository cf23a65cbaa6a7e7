"""Vote rules (pure) and the vote strategy over scripted engines: ties, escalation, weights."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    VoteSummary,
)
from ensemble.vote import VotingStrategy
from ensemble.voting import Sample, consistency_weights, self_confidence, vote
from tests.fakes import ScriptedSamples


def samples(*answers: str | None, expert: str = "a", logprob: float = -1.0) -> list[Sample]:
    return [Sample(expert, str(a), a, logprob) for a in answers]


def test_majority_wins_and_agreement_is_its_share() -> None:
    result = vote(samples("4", "4", "5", "4", None))
    assert result.answer == "4"
    assert result.counts == {"4": 3, "5": 1}
    assert result.agreement == pytest.approx(3 / 5)


def test_tie_goes_to_the_higher_mean_logprob() -> None:
    tied = [
        Sample("a", "x", "x", -2.0),
        Sample("a", "y", "y", -0.5),
        Sample("a", "x", "x", -2.2),
        Sample("a", "y", "y", -0.7),
    ]
    result = vote(tied)
    assert result.answer == "y"
    assert result.winner == 1  # the more confident of the two "y" samples


def test_no_extractable_answer_falls_back_to_the_medoid() -> None:
    texts = ["the cat sat", "a dog ran far away", "the cat sat down"]
    result = vote([Sample("a", t, None) for t in texts])
    assert result.answer is None and result.winner == 0
    assert 0 < result.agreement < 1


def test_weights_decide_between_experts() -> None:
    pool = samples("1", "1", expert="a") + samples("2", "2", "2", expert="b")
    assert vote(pool).answer == "2"
    assert vote(pool, {"a": 0.8, "b": 0.2}).answer == "1"


def test_consistency_weights_favour_the_self_consistent_expert() -> None:
    top = samples("1", "2", "3", "4", "5", expert="top")  # disagrees with itself
    other = samples("7", "7", "7", "7", "7", expert="other")
    weights = consistency_weights(top + other, ["top", "other"])
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["top"] >= 0.5  # anchored, as CoRE anchors its main model
    assert self_confidence(top) == pytest.approx(0.0)
    assert self_confidence(other) == pytest.approx(1.0)


@given(
    st.lists(st.sampled_from(["1", "2", "3", None]), min_size=1, max_size=8),
    st.lists(st.sampled_from(["1", "2", "3", None]), min_size=1, max_size=8),
    st.floats(0.1, 10),
)
def test_vote_is_order_free_and_scale_free(
    a: list[str | None], b: list[str | None], k: float
) -> None:
    pool = samples(*a, expert="a") + [Sample("b", str(x), x, -0.1 * i) for i, x in enumerate(b)]
    weights = consistency_weights(pool, ["a", "b"])
    assert all(w >= 0 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0)
    result = vote(pool, weights)
    scaled = vote(pool, {e: w * k for e, w in weights.items()})
    assert scaled.answer == result.answer
    for order in itertools.islice(itertools.permutations(pool), 5):
        assert vote(list(order), weights).answer == result.answer


def run(
    strategy: VotingStrategy, *experts: ScriptedSamples, params: SamplingParams | None = None
) -> tuple[list[GenerationChunk], EnsembleTrace]:
    request = GenerationRequest("t", (ChatMessage("user", "2+2?"),), params or SamplingParams())
    trace = EnsembleTrace()

    async def go() -> list[GenerationChunk]:
        return [c async for c in strategy.run(request, list(experts), trace)]

    return asyncio.run(go()), trace


def test_the_requests_own_sampling_wins_over_the_pools_defaults() -> None:
    top = ScriptedSamples("top", [("4", -0.1)])
    run(VotingStrategy(samples=3), top, params=SamplingParams(temperature=0.3, top_p=0.5))
    assert (top.calls[0].params.temperature, top.calls[0].params.top_p) == (0.3, 0.5)


def reply(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks if not c.keepalive)


def test_agreeing_top_expert_is_not_escalated() -> None:
    top = ScriptedSamples("top", [("4", -0.1), ("4", -0.2), ("4", -0.3), ("4", -0.1), ("5", -0.1)])
    second = ScriptedSamples("second", [("9", -0.1)])
    chunks, trace = run(VotingStrategy(samples=5, concurrent=False), top, second)
    assert reply(chunks) == "4"
    assert second.calls == []
    assert trace.experts == ["top"]
    assert trace.vote == VoteSummary(
        answers={"4": 4, "5": 1}, answer="4", agreement=0.8, escalated=False
    )
    assert top.calls[0].params.n == 5 and top.calls[0].params.logprobs
    assert top.calls[0].params.temperature == 0.7
    # Usage covers every sample: 5 samples x 2 tokens, the winner's re-sent chunk included.
    assert sum(c.tokens for c in chunks) == 10


def test_disagreeing_top_expert_escalates_and_both_vote() -> None:
    top = ScriptedSamples("top", [("4", -0.1), ("5", -0.2), ("6", -0.3), ("4", -0.1), ("7", -0.1)])
    second = ScriptedSamples("second", [("5", -0.1)])  # agrees with itself, and with one top sample
    chunks, trace = run(VotingStrategy(samples=5, escalate_below=0.8), top, second)
    assert len(second.calls) == 1
    assert trace.experts == ["top", "second"]
    assert trace.vote is not None and trace.vote.escalated is True
    assert sum(trace.weights) == pytest.approx(1.0)
    assert reply(chunks) == "5"  # 1 top + 5 second samples outweigh 2 top samples for "4"
    assert sum(c.tokens for c in chunks) == 20


def test_threshold_zero_never_escalates() -> None:
    top = ScriptedSamples("top", [("1", -0.1), ("2", -0.1), ("3", -0.1)])
    second = ScriptedSamples("second", [("2", -0.1)])
    _, trace = run(VotingStrategy(samples=3, escalate_below=0.0, concurrent=False), top, second)
    assert trace.experts == ["top"] and second.calls == []


def test_concurrent_second_expert_is_dropped_when_the_top_one_agrees() -> None:
    top = ScriptedSamples("top", [("4", -0.1)])
    second = ScriptedSamples("second", [("9", -0.1)], delay_s=0.5)  # still sampling when dropped
    chunks, trace = run(VotingStrategy(samples=3), top, second)
    assert len(second.calls) == 1  # it was started alongside the top expert
    assert trace.experts == ["top"] and reply(chunks) == "4"
    assert sum(c.tokens for c in chunks) == 6  # none of its tokens are counted


def test_a_self_consistent_second_expert_overrides_an_unsure_top() -> None:
    # Model-Switch's point: when the top expert wavers and the next one is sure, trust the next.
    top = ScriptedSamples("top", [("42", -0.1), ("41", -0.5), ("42", -0.2)])
    second = ScriptedSamples("second", [("7", -0.1)])
    chunks, trace = run(VotingStrategy(samples=3), top, second)
    assert reply(chunks) == "7"
    assert trace.weights[0] >= 0.5  # the anchor still holds the top expert at half the vote
