"""`max_cost` and `max_fan_out` through the gateway: the request field and header, the refusals,
`chorus.budget` in plain and streamed answers, and the reported cost against the limit.
Scripted engines, priced in the config: the accounting is the gateway's own."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving.config import load_config
from serving.http.app import create_app
from tests.fakes import FakeEngine, ScriptedSamples, ScriptedSessionEngine
from tests.unit.test_app import wait_ready

CHEAP = "{prompt: 100000, completion: 100000, unit: credits}"  # 0.1 a token
DEAR = "{prompt: 1000000, completion: 1000000, unit: credits}"  # 1 a token
CONFIG = f"""
experts:
  cheap: {{model: bundled:smollm2-135m-instruct, price: {CHEAP}}}
  dear: {{model: bundled:smollm2-135m-instruct, price: {DEAR}}}
  early: {{model: bundled:smollm2-135m-instruct, price: {CHEAP}}}
  s1: {{model: bundled:smollm2-135m-instruct, price: {CHEAP}}}
  s2: {{model: bundled:smollm2-135m-instruct, price: {DEAR}}}
  unpriced: {{model: bundled:smollm2-135m-instruct}}
  other-unit: {{model: bundled:smollm2-135m-instruct, price: {{prompt: 1, completion: 1}}}}
pools:
  auto: {{experts: [dear, cheap]}}
  fallback: {{experts: [early, dear]}}
  once: {{experts: [early, cheap], max_fan_out: 1}}
  vote: {{experts: [cheap, dear], strategy: {{type: vote, samples: 3}}}}
  fuse: {{experts: [s1, s2], strategy: {{type: fuse, max_tokens: 8}}}}
  cascade: {{experts: [s2, s1], strategy: {{type: cascade, draft: s1, max_tokens: 8}}}}
  mixed: {{experts: [cheap, unpriced]}}
  units: {{experts: [cheap, other-unit]}}
"""
ASK = [{"role": "user", "content": "What is the capital of France?"}]


class Engines:
    def __init__(self) -> None:
        self.cheap = ScriptedSamples("cheap", [("Paris", -0.1)])  # 7 prompt, 2 completion tokens
        self.dear = ScriptedSamples("dear", [("Paris", -0.1)])
        self.early = FakeEngine("early", ["never"], fail_after=0)
        self.s1 = ScriptedSessionEngine("s1", "Paris")  # 3 prompt tokens; a step a character
        self.s2 = ScriptedSessionEngine("s2", "Paris")
        self.unpriced = FakeEngine("unpriced", ["Paris"])
        self.other = FakeEngine("other-unit", ["Paris"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "cheap": self.cheap,
            "dear": self.dear,
            "early": self.early,
            "s1": self.s1,
            "s2": self.s2,
            "unpriced": self.unpriced,
            "other-unit": self.other,
        }


@pytest.fixture
def engines() -> Engines:
    return Engines()


@pytest.fixture
def client(tmp_path: Path, engines: Engines) -> Iterator[TestClient]:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    with TestClient(create_app(load_config(path), engines=engines.as_dict())) as test_client:
        wait_ready(test_client)
        yield test_client


def ask(client: TestClient, model: str, **body: Any) -> Any:
    headers = body.pop("headers", {})
    return client.post(
        "/v1/chat/completions", json={"model": model, "messages": ASK, **body}, headers=headers
    )


def events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in text.split("\n\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def test_the_budget_passes_over_an_expert_it_cannot_pay_and_says_so(
    client: TestClient, engines: Engines
) -> None:
    # max_tokens 4: dear could cost 7 + 4 = 11 credits, cheap 0.7 + 0.4.
    response = ask(client, "auto", max_tokens=4, max_cost=5)
    assert response.status_code == 200
    chorus = response.json()["chorus"]
    assert chorus["experts"] == ["cheap"] and engines.dear.calls == []
    assert chorus["cost"] == pytest.approx(0.7 + 0.2) and chorus["cost_unit"] == "credits"
    assert float(response.headers["x-chorus-cost"]) == pytest.approx(chorus["cost"])
    budget = chorus["budget"]
    assert budget["max_cost"] == 5 and budget["spent"] == chorus["cost"] and budget["calls"] == 1
    assert budget["skipped"] == [
        {
            "expert": "dear",
            "call": "answer",
            "limit": "max_cost",
            "asked": 1,
            "kept": 0,
            "worst_case": pytest.approx(11.0),
            "left": 5.0,
        }
    ]
    metrics = client.get("/metrics").text
    assert 'chorus_budget_skips_total{call="answer",limit="max_cost",pool="auto"} 1.0' in metrics


def test_a_streamed_answer_reports_its_budget_in_its_last_chunks(client: TestClient) -> None:
    response = ask(
        client, "auto", max_tokens=4, max_cost=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = events(response.text)
    last = chunks[-1]["chorus"]
    assert last["budget"]["skipped"][0]["expert"] == "dear"
    assert last["budget"]["spent"] == last["cost"] <= 5
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishing[0]["chorus"]["budget"]["skipped"][0]["call"] == "answer"


def test_the_header_sets_max_cost_and_the_body_wins(client: TestClient, engines: Engines) -> None:
    by_header = ask(client, "auto", max_tokens=4, headers={"x-chorus-max-cost": "5"})
    assert by_header.json()["chorus"]["budget"]["max_cost"] == 5
    both = ask(client, "auto", max_tokens=4, max_cost=20, headers={"x-chorus-max-cost": "0.01"})
    assert both.status_code == 200 and both.json()["chorus"]["experts"] == ["dear"]
    assert both.json()["chorus"]["budget"]["skipped"] == []
    no_budget = ask(client, "auto", max_tokens=4)
    assert "budget" not in no_budget.json()["chorus"]
    assert len(engines.dear.calls) == 2


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({"max_cost": "five"}, {}, "max_cost"),
        ({"max_cost": -1}, {}, "max_cost"),
        ({"max_cost": True}, {}, "max_cost"),
        ({"max_cost": [1]}, {}, "max_cost"),
        ({}, {"x-chorus-max-cost": "lots"}, "x-chorus-max-cost"),
        ({}, {"x-chorus-max-cost": "-0.5"}, "x-chorus-max-cost"),
        ({}, {"x-chorus-max-cost": "nan"}, "x-chorus-max-cost"),
        ({}, {"x-chorus-max-cost": "inf"}, "x-chorus-max-cost"),
    ],
)
def test_a_max_cost_that_is_not_a_number_ge_0_is_a_400_naming_it(
    client: TestClient, body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    response = ask(client, "auto", headers=headers, **body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_nothing_that_fits_is_a_400_before_any_model_call(
    client: TestClient, engines: Engines
) -> None:
    for model in ("auto", "vote", "fuse", "cascade", "cheap"):
        for stream in (False, True):
            response = ask(client, model, max_tokens=4, max_cost=0.05, stream=stream)
            assert response.status_code == 400, model
            error = response.json()["error"]
            assert error["param"] == "max_cost" and "raise `max_cost`" in error["message"]
    assert engines.cheap.calls == [] and engines.dear.calls == []
    assert engines.s1.sessions == [] and engines.s2.sessions == []


def test_a_target_without_costs_in_one_unit_refuses_max_cost(client: TestClient) -> None:
    for model, names in (("mixed", "`unpriced`"), ("unpriced", "`unpriced`"), ("units", "units")):
        response = ask(client, model, max_tokens=4, max_cost=100)
        assert response.status_code == 400, model
        error = response.json()["error"]
        assert error["param"] == "max_cost" and names in error["message"]
    assert ask(client, "mixed", max_tokens=4).status_code == 200  # without max_cost: as ever


def test_a_fallback_beyond_max_cost_is_not_taken_and_the_error_says_so(
    client: TestClient, engines: Engines
) -> None:
    refused = ask(client, "fallback", max_tokens=4, max_cost=5)
    assert refused.status_code == 502
    message = refused.json()["error"]["message"]
    assert "the fallback to `dear` was not taken" in message and "left of `max_cost`" in message
    assert engines.dear.calls == []
    # Enough for the fallback alone: the failed call cost nothing reported, so it is taken.
    taken = ask(client, "fallback", max_tokens=4, max_cost=11.05)
    assert taken.status_code == 200
    chorus = taken.json()["chorus"]
    assert chorus["failed"] == ["early"] and chorus["experts"] == ["dear"]
    assert chorus["cost"] <= 11.05 and chorus["budget"]["calls"] == 2


def test_a_pool_fan_out_cap_of_one_takes_no_fallback(client: TestClient) -> None:
    response = ask(client, "once", max_tokens=4)
    assert response.status_code == 502
    assert "`max_fan_out` of 1 calls was used up" in response.json()["error"]["message"]
    metrics = client.get("/metrics").text
    assert 'chorus_budget_skips_total{call="fallback",limit="max_fan_out",pool="once"}' in metrics
    models = {m["id"]: m["chorus"] for m in client.get("/v1/models").json()["data"]}
    assert models["once"]["max_fan_out"] == 1 and models["auto"]["max_fan_out"] is None


def test_a_vote_keeps_the_samples_it_can_pay_for(client: TestClient, engines: Engines) -> None:
    # cheap's prompt 0.7, each sample up to 4 tokens (0.4): two of the three samples fit.
    response = ask(client, "vote", max_tokens=4, max_cost=0.7 + 2 * 0.4 + 0.01)
    chorus = response.json()["chorus"]
    assert engines.cheap.calls[0].params.n == 2 and engines.dear.calls == []
    assert sum(chorus["vote"]["answers"].values()) == 2
    assert [(c["expert"], c["call"], c["kept"]) for c in chorus["budget"]["skipped"]] == [
        ("cheap", "samples", 2)
    ]


def test_fuse_and_cascade_leave_out_the_expert_they_cannot_pay(
    client: TestClient, engines: Engines
) -> None:
    # s1: 3 prompt tokens at 0.1; s2: 3 at 1; the answer's 8 tokens at the dearest rate.
    fused = ask(client, "fuse", max_cost=0.3 + 0.8 + 0.01).json()["chorus"]
    assert fused["experts"] == ["s1"] and engines.s2.sessions == []
    assert fused["budget"]["skipped"][0]["expert"] == "s2"
    cascaded = ask(client, "cascade", max_cost=0.3 + 0.8 + 0.01).json()["chorus"]
    assert cascaded["experts"] == ["s1"] and cascaded["cascade"]["share"] == {"s1": 1.0}
    both = ask(client, "fuse", max_cost=3.3 + 8 + 0.01).json()["chorus"]
    assert set(both["fusion"]["share"]) == {"s1", "s2"} and both["budget"]["skipped"] == []
    assert both["cost"] <= 3.3 + 8 + 0.01


@pytest.mark.parametrize("model", ["auto", "fallback", "vote", "fuse", "cascade", "cheap"])
def test_the_reported_cost_never_exceeds_max_cost(client: TestClient, model: str) -> None:
    rng = random.Random(model)
    answered = 0
    for _ in range(25):
        max_cost = rng.choice([0.0, 0.5, 1.0, 2.0, 5.0, 12.0, 50.0]) * rng.random()
        stream = rng.random() < 0.5
        response = ask(
            client, model, max_tokens=rng.randint(5, 8), max_cost=max_cost, stream=stream
        )
        if response.status_code == 400:
            assert response.json()["error"]["param"] == "max_cost"
            continue
        if response.status_code == 502:  # `fallback` when dear does not fit
            continue
        assert response.status_code == 200
        chorus = events(response.text)[-1]["chorus"] if stream else response.json()["chorus"]
        assert chorus["cost"] <= max_cost and chorus["budget"]["spent"] == chorus["cost"]
        answered += 1
    assert answered > 0


def test_legacy_completions_take_max_cost_for_one_prompt(client: TestClient) -> None:
    one = client.post(
        "/v1/completions",
        json={"model": "auto", "prompt": "Paris is", "max_tokens": 4, "max_cost": 5},
    )
    assert one.status_code == 200 and one.json()["chorus"]["experts"] == ["cheap"]
    several = client.post(
        "/v1/completions",
        json={"model": "auto", "prompt": ["a", "b"], "max_tokens": 4, "max_cost": 5},
    )
    assert several.status_code == 400 and several.json()["error"]["param"] == "max_cost"
