"""`max_cost` on the real server (the session's, configs/default.yaml: three real experts, costed
in the seconds their calibration measured), through the official `openai` SDK: each strategy
starts only what fits, and the cost in the body, the header and the metric agree and stay within
the limit. Fallbacks, cascades and a pool's `max_fan_out`: tests/integration/test_faults.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.loopback import metric

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


class Prices:
    """What the server charges per token, and each expert's prompt tokens for QUESTION."""

    def __init__(self, client: openai.OpenAI) -> None:
        cards = {m.id: m.model_extra["chorus"] for m in client.models.list().data}
        experts = [name for name, card in cards.items() if card["type"] == "expert"]
        self.prompt = {e: cards[e]["cost"]["per_million_prompt_tokens"] / 1e6 for e in experts}
        self.completion = {
            e: cards[e]["cost"]["per_million_completion_tokens"] / 1e6 for e in experts
        }
        self.tokens = {}
        for expert in experts:
            reply = client.chat.completions.create(model=expert, messages=QUESTION, max_tokens=1)
            self.tokens[expert] = reply.model_extra["chorus"]["usage"][expert]["prompt_tokens"]

    def prompt_cost(self, expert: str) -> float:
        return self.tokens[expert] * self.prompt[expert]

    def worst(self, expert: str, max_tokens: int, sequences: int = 1) -> float:
        """A call's worst case, as the issue defines it: its prompt tokens at the prompt price,
        and max_tokens completion tokens (per sequence) at the completion price."""
        return self.prompt_cost(expert) + sequences * max_tokens * self.completion[expert]


@pytest.fixture(scope="module")
def prices(client: openai.OpenAI) -> Prices:
    return Prices(client)


def routed(client: openai.OpenAI, model: str) -> list[str]:
    """The experts the pool routes QUESTION to, best first (they do not depend on a budget)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, max_tokens=1
    )
    return raw.headers["x-chorus-experts"].split(",")


def answer(
    server: ServerProcess, client: openai.OpenAI, model: str, max_cost: float, **extra: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `chorus` object of an answer under `max_cost`, after checking that the body, the
    header and the metric report one cost, within the limit."""
    before = metric(server.url, "chorus_cost_total", pool=model)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, extra_body={"max_cost": max_cost}, **extra
    )
    completion = raw.parse()
    chorus = completion.model_extra["chorus"]
    assert chorus["cost"] <= max_cost
    assert chorus["budget"]["max_cost"] == max_cost and chorus["budget"]["spent"] == chorus["cost"]
    assert float(raw.headers["x-chorus-cost"]) == pytest.approx(chorus["cost"], rel=1e-5)
    spent = metric(server.url, "chorus_cost_total", pool=model) - before
    assert spent == pytest.approx(chorus["cost"], rel=1e-9)
    return chorus, completion.model_dump()


def test_an_expert_answers_within_its_worst_case_and_is_refused_below_it(
    server: ServerProcess, client: openai.OpenAI, prices: Prices
) -> None:
    worst = prices.worst(SMOLLM2, max_tokens=8)
    chorus, _ = answer(server, client, SMOLLM2, worst * 1.02, max_tokens=8)
    assert chorus["experts"] == [SMOLLM2] and chorus["budget"]["skipped"] == []
    # Just below its worst case it is never started: a 400 naming max_cost, by body or header.
    for extra in (
        {"extra_body": {"max_cost": worst * 0.98}},
        {"extra_headers": {"x-chorus-max-cost": f"{worst * 0.98:.9f}"}},
        {"extra_body": {"max_cost": worst * 0.98}, "stream": True},
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=SMOLLM2, messages=QUESTION, max_tokens=8, **extra)
        assert refused.value.body["param"] == "max_cost"  # type: ignore[index]
        assert "raise `max_cost`" in refused.value.body["message"]  # type: ignore[index]


def test_the_routed_pool_passes_over_the_expert_it_cannot_pay(
    server: ServerProcess, client: openai.OpenAI, prices: Prices
) -> None:
    first, second = routed(client, "auto")
    worst = {e: prices.worst(e, max_tokens=8) for e in (first, second)}
    assert worst[second] < worst[first], "the router's first choice is its dearer expert here"
    max_cost = (worst[first] + worst[second]) / 2
    chorus, _ = answer(server, client, "auto", max_cost, max_tokens=8)
    assert chorus["experts"] == [second]
    (cut,) = chorus["budget"]["skipped"]
    assert (cut["expert"], cut["call"], cut["limit"], cut["kept"]) == (
        first,
        "answer",
        "max_cost",
        0,
    )
    assert cut["worst_case"] == pytest.approx(worst[first], rel=1e-6)
    # Without the budget the first choice answers, as ever.
    plain = client.chat.completions.create(model="auto", messages=QUESTION, max_tokens=8)
    assert plain.model_extra["chorus"]["experts"] == [first]
    assert "budget" not in plain.model_extra["chorus"]


def test_a_streamed_answer_reports_what_its_budget_cut(
    client: openai.OpenAI, prices: Prices
) -> None:
    first, second = routed(client, "auto")
    max_cost = (prices.worst(first, 8) + prices.worst(second, 8)) / 2
    stream = client.chat.completions.create(
        model="auto", messages=QUESTION, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-chorus-max-cost": str(max_cost)},
    )  # fmt: skip
    chunks = list(stream)
    chorus = chunks[-1].model_extra["chorus"]
    assert chorus["experts"] == [second] and chorus["cost"] <= max_cost
    assert chorus["budget"]["skipped"][0]["expert"] == first
    assert chorus["budget"]["spent"] == chorus["cost"]


def test_a_vote_keeps_the_samples_it_can_pay_and_does_not_escalate_beyond(
    server: ServerProcess, client: openai.OpenAI, prices: Prices
) -> None:
    top, nxt = routed(client, "vote")
    # Three of the vote's five samples of up to 4 tokens, and not one more.
    max_cost = prices.worst(top, max_tokens=4, sequences=3) + 0.5 * 4 * prices.completion[top]
    chorus, _ = answer(server, client, "vote", max_cost, max_tokens=4)
    assert chorus["experts"] == [top] and not chorus["vote"]["escalated"]
    assert chorus["usage"][top]["completion_tokens"] <= 3 * 4
    cuts = [(c["expert"], c["call"], c["asked"], c["kept"]) for c in chorus["budget"]["skipped"]]
    assert cuts[0] == (top, "samples", 5, 3)
    # The next expert is passed over if the vote wanted it: nothing of it fits.
    assert cuts[1:] in ([], [(nxt, "escalation", 5, 0)])
    assert nxt not in chorus["usage"]


def test_fusion_decodes_with_the_experts_it_can_pay(
    server: ServerProcess, client: openai.OpenAI, prices: Prices
) -> None:
    primary, other = routed(client, "fuse")
    alone = prices.prompt_cost(primary) + 8 * prices.completion[primary]
    rate = max(prices.completion[primary], prices.completion[other])
    together = prices.prompt_cost(primary) + prices.prompt_cost(other) + 8 * rate
    chorus, _ = answer(server, client, "fuse", (alone + together) / 2, max_tokens=8)
    assert set(chorus["fusion"]["share"]) == {primary} and list(chorus["usage"]) == [primary]
    cut = chorus["budget"]["skipped"]
    assert [(c["expert"], c["call"]) for c in cut] == [(other, "fan-out")]
    both, _ = answer(server, client, "fuse", together * 1.02, max_tokens=8)
    assert set(both["fusion"]["share"]) == {primary, other} and both["budget"]["skipped"] == []


def test_a_budget_without_max_tokens_prices_the_experts_default(
    server: ServerProcess, client: openai.OpenAI, prices: Prices
) -> None:
    # No max_tokens: the expert may write its configured default (256 tokens), so that is priced.
    worst = prices.worst(SMOLLM2, max_tokens=256)
    chorus, _ = answer(server, client, SMOLLM2, worst * 1.02)
    assert chorus["usage"][SMOLLM2]["completion_tokens"] <= 256
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=SMOLLM2, messages=QUESTION, extra_body={"max_cost": worst * 0.98}
        )


def test_invalid_max_cost_is_a_400_naming_it(server: ServerProcess) -> None:
    for body, headers, param in (
        ({"max_cost": -1}, {}, "max_cost"),
        ({"max_cost": "cheap"}, {}, "max_cost"),
        ({}, {"x-chorus-max-cost": "cheap"}, "x-chorus-max-cost"),
    ):
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "auto", "messages": QUESTION, "max_tokens": 2, **body},
            headers=headers,
            timeout=60,
        )
        assert response.status_code == 400
        assert json.loads(response.text)["error"]["param"] == param
