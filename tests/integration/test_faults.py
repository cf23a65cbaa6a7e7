"""Faults on a real server: an expert that stalls (a real HTTP upstream that stops talking), and
a storm of clients that leave mid-stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tests import loopback
from tests.conftest import ServerProcess
from tests.loopback import serve_in_thread

pytestmark = pytest.mark.integration


# -- an upstream that stalls ------------------------------------------------------------------


async def _models(_: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": "staller", "object": "model"}]})


async def _chat(request: Request) -> StreamingResponse:
    """Streams two words then goes silent; with "early" in the prompt, silent from the start."""
    body = await request.json()
    early = "early" in body["messages"][-1]["content"]

    async def events() -> AsyncIterator[str]:
        if not early:
            for word in ("Stalling", " now"):
                delta = {"choices": [{"index": 0, "delta": {"content": word}}]}
                yield f"data: {json.dumps(delta)}\n\n"
        await asyncio.sleep(3600)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _tokenize(_: Request) -> JSONResponse:
    return JSONResponse({"tokens": [1, 2, 3], "count": 3, "max_model_len": 2048})


async def _completions(_: Request) -> JSONResponse:
    """Decode-session steps: never answered."""
    await asyncio.sleep(3600)
    return JSONResponse({})


@pytest.fixture(scope="module")
def staller() -> Iterator[str]:
    app = Starlette(
        routes=[
            Route("/v1/models", _models),
            Route("/v1/chat/completions", _chat, methods=["POST"]),
            Route("/tokenize", _tokenize, methods=["POST"]),
            Route("/v1/completions", _completions, methods=["POST"]),
        ]
    )
    with serve_in_thread(app) as url:  # cuts the streams it holds open (they sleep an hour)
        yield url


@pytest.fixture(scope="module")
def gateway(staller: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("faults") / "c.yaml"
    # Priced in credits (for `max_cost`): SmolLM2 1 a token; the staller nothing; `dear-staller`
    # (the same upstream) 1000 a prompt token; `unpriced` has no cost at all.
    remote = f"engine: openai, base_url: {staller}/v1, model: staller, retries: 0"
    path.write_text(
        "experts:\n"
        "  smollm2-135m-instruct:\n"
        "    model: bundled:smollm2-135m-instruct\n"
        "    max_model_len: 2048\n"
        "    price: {prompt: 1000000, completion: 1000000, unit: credits}\n"
        "  staller:\n"
        "    engine: openai\n"
        f"    base_url: {staller}/v1\n"
        "    model: staller\n"
        "    retries: 0\n"
        "    first_token_timeout_s: 2\n"
        "    token_timeout_s: 1\n"
        "    price: {prompt: 0, completion: 0, unit: credits}\n"
        f"  dear-staller: {{{remote}, price: {{prompt: 1.0e+9, completion: 0, unit: credits}}}}\n"
        f"  unpriced: {{{remote}}}\n"
        "pools:\n"
        "  single: {experts: [staller, smollm2-135m-instruct]}\n"
        "  once: {experts: [staller, smollm2-135m-instruct], max_fan_out: 1}\n"
        "  vote:\n"
        "    experts: [staller, smollm2-135m-instruct]\n"
        "    strategy: {type: vote, samples: 3, keepalive_s: 0.5}\n"
        "  fuse: {experts: [smollm2-135m-instruct, staller], strategy: fuse}\n"
        "  cascade:\n"
        "    experts: [smollm2-135m-instruct, dear-staller]\n"
        "    strategy: {type: cascade, draft: dear-staller}\n"
    )
    srv = ServerProcess(path)
    try:
        srv.wait_ready(60)
        yield srv
    finally:
        srv.stop()


def ask(srv: ServerProcess, model: str, prompt: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)


def metric(srv: ServerProcess, name: str, **labels: str) -> float:
    return loopback.metric(srv.url, name, **labels)


def test_an_expert_silent_from_the_start_is_timed_out_and_the_next_one_answers(
    gateway: ServerProcess,
) -> None:
    started = time.monotonic()
    response = ask(gateway, "single", "Say hi (early)", max_tokens=8, temperature=0)
    assert response.status_code == 200
    body = response.json()
    assert body["chorus"]["experts"] == ["smollm2-135m-instruct"]
    assert body["chorus"]["failed"] == ["staller"]
    assert body["choices"][0]["message"]["content"]
    assert 2 <= time.monotonic() - started < 30  # waited out the first-token timeout, no more
    assert metric(gateway, "chorus_fallbacks_total", pool="single") >= 1


def test_an_expert_that_stalls_mid_stream_ends_the_stream_with_an_error_event(
    gateway: ServerProcess,
) -> None:
    body = {
        "model": "single",
        "messages": [{"role": "user", "content": "Say hi"}],
        "stream": True,
    }
    events = []
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert time.monotonic() - started < 30
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "timeout" and "staller timed out" in error["message"]
    text = "".join(
        c["delta"].get("content") or ""
        for e in events[:-2]
        for c in json.loads(e).get("choices", [])
    )
    assert text == "Stalling now"
    before = metric(gateway, "chorus_expert_failures_total", expert="staller")
    assert before >= 1


def test_a_vote_carries_on_without_an_expert_that_stalls(gateway: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="vote", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=12
    )
    chorus = reply.model_extra["chorus"]
    assert chorus["failed"] == ["staller"]
    assert chorus["experts"] == ["smollm2-135m-instruct"]
    assert reply.choices[0].message.content
    assert httpx.get(f"{gateway.url}/health").status_code == 200


def test_fusion_carries_on_without_an_expert_that_stalls(gateway: ServerProcess) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    alone = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=question, max_tokens=12, temperature=0
    )
    fused = client.chat.completions.create(
        model="fuse", messages=question, max_tokens=12, temperature=0
    )
    assert fused.model_extra["chorus"]["failed"] == ["staller"]
    # the staller never gave a view, so the answer is the other expert's own greedy one
    assert fused.choices[0].message.content == alone.choices[0].message.content


# -- a budget under faults: fallbacks, cascades, a fan-out cap --------------------------------

SMOLLM2 = "smollm2-135m-instruct"
EARLY = [{"role": "user", "content": "Say hi (early)"}]  # the staller is silent from the start


def smollm2_prompt_tokens(client: openai.OpenAI, messages: list[dict[str, str]]) -> int:
    reply = client.chat.completions.create(model=SMOLLM2, messages=messages, max_tokens=1)
    tokens: int = reply.model_extra["chorus"]["usage"][SMOLLM2]["prompt_tokens"]
    return tokens


def test_a_fallback_beyond_max_cost_is_not_taken_and_the_error_says_so(
    gateway: ServerProcess,
) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    worst = smollm2_prompt_tokens(client, EARLY) + 8  # credits: 1 a token, up to 8 written
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model="single", messages=EARLY, max_tokens=8, extra_body={"max_cost": worst - 0.5}
        )
    assert refused.value.status_code == 504  # the staller's timeout, and nothing after it
    message = refused.value.body["message"]  # type: ignore[index]
    assert "staller timed out" in message
    assert f"the fallback to `{SMOLLM2}` was not taken" in message
    assert metric(gateway, "chorus_budget_skips_total", pool="single", call="fallback") >= 1
    # Enough for the fallback: the staller's failed call cost nothing reported, so it is taken.
    raw = client.chat.completions.with_raw_response.create(
        model="single", messages=EARLY, max_tokens=8, extra_body={"max_cost": worst + 0.5}
    )
    chorus = raw.parse().model_extra["chorus"]
    assert chorus["failed"] == ["staller"] and chorus["experts"] == [SMOLLM2]
    assert chorus["cost"] <= worst + 0.5 and chorus["budget"]["calls"] == 2
    assert float(raw.headers["x-chorus-cost"]) == pytest.approx(chorus["cost"], rel=1e-5)


def test_a_cascade_leaves_out_the_expert_it_cannot_pay(gateway: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    max_cost = smollm2_prompt_tokens(client, question) + 8 + 1  # not the draft's 3000 too
    alone = client.chat.completions.create(
        model=SMOLLM2, messages=question, max_tokens=8, temperature=0
    )
    cascaded = client.chat.completions.create(
        model="cascade", messages=question, max_tokens=8, temperature=0,
        extra_body={"max_cost": max_cost},
    )  # fmt: skip
    chorus = cascaded.model_extra["chorus"]
    assert chorus["cascade"]["share"] == {SMOLLM2: 1.0} and chorus["cost"] <= max_cost
    cut = chorus["budget"]["skipped"]
    assert [(c["expert"], c["call"], c["limit"]) for c in cut] == [
        ("dear-staller", "fan-out", "max_cost")
    ]
    assert cut[0]["worst_case"] >= 3000  # its three prompt tokens, counted by its /tokenize
    assert cascaded.choices[0].message.content == alone.choices[0].message.content


def test_a_fan_out_cap_of_one_takes_no_fallback(gateway: ServerProcess) -> None:
    response = ask(gateway, "once", "Say hi (early)", max_tokens=8)
    assert response.status_code == 504
    assert "`max_fan_out` of 1 calls was used up" in response.json()["error"]["message"]
    assert metric(gateway, "chorus_budget_skips_total", pool="once", limit="max_fan_out") >= 1


def test_an_expert_without_costs_refuses_max_cost(gateway: ServerProcess) -> None:
    response = ask(gateway, "unpriced", "Say hi", max_tokens=8, max_cost=1000)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_cost" and "`unpriced` has no price" in error["message"]


# -- clients leaving --------------------------------------------------------------------------


async def _leave_after_first_token(url: str) -> bool:
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 400,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                return True  # leave: the connection closes with the client
    return False


def test_a_disconnect_storm_leaves_no_work_behind(server: ServerProcess) -> None:
    async def storm() -> list[bool]:
        return await asyncio.gather(*(_leave_after_first_token(server.url) for _ in range(24)))

    assert all(asyncio.run(storm()))
    deadline = time.monotonic() + 30
    while metric(server, "chorus_inflight_requests") > 0:
        assert time.monotonic() < deadline, "requests still in flight after their clients left"
        time.sleep(0.2)
    labels = {"expert": "smollm2-135m-instruct", "kind": "completion"}
    tokens = metric(server, "chorus_tokens_total", **labels)
    time.sleep(1.5)
    after = metric(server, "chorus_tokens_total", **labels)
    assert after == tokens, "the engine kept generating for clients that left"
    ok = ask(server, "smollm2-135m-instruct", "Say hi", max_tokens=4)
    assert ok.status_code == 200
