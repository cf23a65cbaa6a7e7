"""`POST /v1/completions` with scripted engines: the gateway's own part (shapes, list prompts,
echo, legacy logprobs, refusals, accounting) and the `openai` engine's raw prompts against a
scripted upstream. The real models and the real server: tests/integration/test_completions.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from fastapi.testclient import TestClient
from openai.types import completion_create_params

from ensemble.types import GenerationRequest, SamplingParams
from serving.config import OpenAIExpertConfig, load_config
from serving.engines.openai.engine import RemoteOpenAIEngine
from serving.http.app import create_app
from tests.fakes import ScriptedSamples, ScriptedSessionEngine
from tests.unit.test_app import wait_ready
from tests.upstream import serve

CONFIG = """
experts:
  solo: {model: bundled:smollm2-135m-instruct}
  other: {model: bundled:smollm2-135m-instruct}
  s1: {model: bundled:smollm2-135m-instruct}
  s2: {model: bundled:smollm2-135m-instruct}
pools:
  auto: {experts: [solo, other]}
  vote: {experts: [solo, other], strategy: {type: vote, samples: 3}}
  fuse: {experts: [s1, s2], strategy: {type: fuse}}
  cascade: {experts: [s1, s2], strategy: {type: cascade}}
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, ScriptedSamples]]:
    path = tmp_path_factory.mktemp("completions") / "c.yaml"
    path.write_text(CONFIG)
    solo = ScriptedSamples("solo", [(" one", -0.5), (" two", -1.5)])
    engines = {
        "solo": solo,
        "other": ScriptedSamples("other", [(" other", -0.1)]),
        "s1": ScriptedSessionEngine("s1", "abc"),
        "s2": ScriptedSessionEngine("s2", "abc"),
    }
    with TestClient(create_app(load_config(path), engines=engines)) as client:
        wait_ready(client)
        yield client, solo


def post(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/completions", json=body)


def events(text: str) -> list[dict[str, Any]]:
    assert text.rstrip().endswith("data: [DONE]")
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def test_a_raw_prompt_reaches_the_engine_as_it_is(
    app: tuple[TestClient, ScriptedSamples],
) -> None:
    client, solo = app
    solo.calls.clear()
    body = post(client, model="solo", prompt="Once upon", max_tokens=5, stop=["\n"]).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "solo"
    assert body["choices"] == [
        {"index": 0, "text": " one", "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert body["chorus"]["experts"] == ["solo"]
    (request,) = solo.calls
    assert request.prompt == "Once upon" and request.messages == ()  # no chat to template
    assert request.params.max_tokens == 5 and request.params.stop == ("\n",)


def test_max_tokens_defaults_to_sixteen_as_in_openai(
    app: tuple[TestClient, ScriptedSamples],
) -> None:
    client, solo = app
    solo.calls.clear()
    assert post(client, model="solo", prompt="x").status_code == 200
    assert solo.calls[0].params.max_tokens == 16


def test_a_list_of_prompts_gives_n_choices_per_prompt_in_order(
    app: tuple[TestClient, ScriptedSamples],
) -> None:
    client, solo = app
    solo.calls.clear()
    body = post(client, model="auto", prompt=["A", "B"], n=2, echo=True).json()
    texts = [(c["index"], c["text"]) for c in body["choices"]]
    assert texts == [(0, "A one"), (1, "A two"), (2, "B one"), (3, "B two")]
    assert [r.prompt for r in solo.calls] == ["A", "B"]
    # Each prompt's tokens count once per prompt; every sample's completion counts.
    assert body["usage"]["prompt_tokens"] == 14 and body["usage"]["completion_tokens"] == 8
    assert body["chorus"]["experts"] == ["solo"]  # listed once, though it answered twice


def test_legacy_logprobs_with_offsets(app: tuple[TestClient, ScriptedSamples]) -> None:
    client, _ = app
    body = post(client, model="solo", prompt="x", logprobs=1).json()
    assert body["choices"][0]["logprobs"] == {
        "tokens": [" one"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{" one": -0.5}],  # the chosen token is always there
        "text_offset": [0],
    }


def test_streamed_chunks_with_echo_and_usage(app: tuple[TestClient, ScriptedSamples]) -> None:
    client, _ = app
    body = {
        "model": "solo",
        "prompt": ["A", "B"],
        "echo": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = events(post(client, **body).text)
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    text: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
    assert text == {0: "A one", 1: "B one"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes.count("stop") == 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_streamed_logprob_offsets_run_on_after_the_echo() -> None:
    from ensemble.types import TokenLogprob
    from serving.api.completion_responses import TextCompletionShape

    shape = TextCompletionShape(("Hi",), 1, echo=True, logprobs=True)
    assert shape.opening(0) == {"index": 0, "text": "Hi", "logprobs": None, "finish_reason": None}
    first = shape.delta(0, " a", None, (TokenLogprob(" a", -1.0),))
    second = shape.delta(0, " b", "stop", (TokenLogprob(" b", -2.0),))
    assert first["logprobs"]["text_offset"] == [2]
    assert second["logprobs"]["text_offset"] == [4]


@pytest.mark.parametrize("pool", ["vote", "fuse", "cascade"])
def test_pools_that_read_or_fuse_answers_refuse_raw_prompts(
    app: tuple[TestClient, ScriptedSamples], pool: str
) -> None:
    client, _ = app
    response = post(client, model=pool, prompt="x")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"prompt": [1, 2, 3]}, "prompt"),  # token ids
        ({"n": 99}, "n"),
        ({"logprobs": 99}, "logprobs"),
        ({"stream_options": {"include_usage": True}}, None),  # without stream
    ],
)
def test_what_chorus_cannot_honour_is_refused_by_name(
    app: tuple[TestClient, ScriptedSamples], body: dict[str, Any], param: str | None
) -> None:
    client, _ = app
    response = post(client, **{"model": "solo", "prompt": "x", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_harmless_values_are_accepted(app: tuple[TestClient, ScriptedSamples]) -> None:
    client, _ = app
    harmless = {"suffix": None, "best_of": 1, "logit_bias": {}, "presence_penalty": 0, "user": "u"}
    assert post(client, model="solo", prompt="x", **harmless).status_code == 200


def test_every_sdk_completions_field_is_known() -> None:
    """Each request field of the SDK's completions API is read or refused by name here."""
    read = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed"}
    read |= {"stream_options", "logprobs", "echo", "user"}
    refused = {"suffix", "best_of", "logit_bias", "presence_penalty", "frequency_penalty"}
    sdk = set(completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert sdk == read | refused


def test_completions_are_counted_like_chat(app: tuple[TestClient, ScriptedSamples]) -> None:
    client, _ = app

    def requests_total() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('chorus_requests_total{pool="other",status="200"'):
                return float(line.split()[-1])
        return 0.0

    before = requests_total()
    post(client, model="other", prompt="x")
    post(client, model="other", prompt="x", stream=True)
    assert requests_total() == before + 2


# -- the `openai` engine -------------------------------------------------------------------------


def test_the_openai_engine_sends_a_raw_prompt_to_the_upstream_completions() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    event = {
        "choices": [
            {
                "index": 0,
                "text": " Paris",
                "finish_reason": "stop",
                "logprobs": {
                    "tokens": [" Paris"],
                    "token_logprobs": [-0.25],
                    "top_logprobs": [{" Paris": -0.25, " Lyon": -2.0}],
                    "text_offset": [0],
                },
            }
        ]
    }
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":  # the health probe
            return web.json_response({"data": []})
        seen.append((request.path, await request.json()))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for item in (event, usage):
            await response.write(f"data: {json.dumps(item)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    params = SamplingParams(max_tokens=4, stop=(".",), logprobs=True, top_logprobs=1)
    request = GenerationRequest("r", (), params, prompt="The capital of France is")

    async def run() -> list[Any]:
        async with serve(handler) as url:
            config = OpenAIExpertConfig(
                engine="openai", base_url=f"{url}/v1", model="m", stop=["\nUser:"]
            )
            engine = RemoteOpenAIEngine("up", config)
            await engine.start()
            try:
                return [c async for c in engine.generate(request)]
            finally:
                await engine.aclose()

    chunks = asyncio.run(run())
    ((path, body),) = seen
    assert path == "/v1/completions"
    assert body["prompt"] == "The capital of France is" and "messages" not in body
    assert body["stop"] == ["."]  # the expert's chat-turn stop is not a raw prompt's
    assert body["logprobs"] == 1 and "top_logprobs" not in body
    assert "".join(c.text for c in chunks) == " Paris"
    (lp,) = chunks[0].logprobs
    assert (lp.token, lp.logprob) == (" Paris", -0.25)
    assert {t.token for t in lp.top} == {" Paris", " Lyon"}
    assert chunks[-1].prompt_tokens == 5
