"""Tools and structured outputs through the real server (`chorus serve` on loopback), driven by
the official `openai` SDK's own helpers: the tool-calling loop (call, tool result, final
answer), `chat.completions.parse` and `chat.completions.stream` with pydantic models, with the
bundled Qwen2.5-Coder expert (its template renders tools), addressed directly and through the
routed `auto` pool; and every refusal with its `param`."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration

SMOLLM2, GEMMA, QWEN = "smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str


class Person(BaseModel):
    name: str
    age: int


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")
ANN = [{"role": "user", "content": "Ann is 31 years old. Give her name and age as JSON."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _call(client: openai.OpenAI, model: str, stream: bool, **kw: Any) -> Any:
    """One request, as the SDK's helpers make it: `stream` assembles the chunks (and parses
    strict tools' arguments) into a final completion, as `create` returns one."""
    if stream:
        with client.chat.completions.stream(model=model, **kw) as events:
            kinds = {event.type for event in events}
            completion = events.get_final_completion()
        if completion.choices[0].message.tool_calls:
            assert "tool_calls.function.arguments.done" in kinds
        return completion
    return client.chat.completions.parse(model=model, **kw)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("model", [QWEN, "auto"])
def test_the_sdk_tool_loop_call_result_answer(
    client: openai.OpenAI, model: str, stream: bool
) -> None:
    messages: list[Any] = list(ASK_WEATHER)
    first = _call(
        client, model, stream, messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
        temperature=0, max_tokens=60,
    )  # fmt: skip
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.parsed_arguments == GetWeather(city="Paris")  # the SDK parsed them
    # A routed pool sends a tool request only to an expert whose template renders tools.
    assert first.model_extra["chorus"]["experts"] == [QWEN]

    messages.append(choice.message)
    messages.append(
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 22})}
    )
    final = _call(
        client, model, stream, messages=messages, tools=[WEATHER_TOOL], temperature=0,
        max_tokens=40,
    )  # fmt: skip
    answer = final.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "22" in (answer.message.content or "")  # it read the tool's result


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_named_tool_choice_is_called_with_valid_arguments(
    client: openai.OpenAI, stream: bool
) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    completion = _call(
        client, QWEN, stream, messages=[{"role": "user", "content": "Hello!"}],
        tools=[WEATHER_TOOL], tool_choice=choice, temperature=0, max_tokens=40,
    )  # fmt: skip
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=QWEN, messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="none",  # type: ignore[list-item]
        temperature=0, max_tokens=30,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content


@pytest.mark.parametrize(
    ("model", "stream"),
    [(QWEN, False), (QWEN, True), ("auto", False), (SMOLLM2, True)],
    ids=["qwen-json", "qwen-sse", "auto-json", "smollm2-sse"],
)
def test_parse_helper_gets_a_valid_pydantic_object(
    client: openai.OpenAI, model: str, stream: bool
) -> None:
    completion = _call(
        client, model, stream, messages=ANN, response_format=Person, temperature=0,
        max_tokens=40,
    )  # fmt: skip
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person)  # the SDK validated it against the model
    if model != SMOLLM2:  # the smallest model fills the schema, not always with the facts
        assert parsed == Person(name="Ann", age=31)


def test_json_object_is_an_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=GEMMA, messages=ANN, response_format={"type": "json_object"}, temperature=0,
        max_tokens=40,
    )  # fmt: skip
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_a_vote_pool_votes_over_canonical_json(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="vote", messages=ANN, response_format=Person, max_tokens=40
    )
    assert isinstance(completion.choices[0].message.parsed, Person)
    answers = completion.model_extra["chorus"]["vote"]["answers"]
    assert sum(answers.values()) >= 5  # every sample (5 in the pool) read as JSON, none lost
    for answer in answers:  # each sample's answer is its whole JSON value in canonical form
        assert answer == json.dumps(json.loads(answer), sort_keys=True, separators=(",", ":"))
        Person.model_validate_json(answer)  # the object, not a number read out of it


@pytest.mark.parametrize(
    ("model", "extra", "param"),
    [
        (SMOLLM2, {"tools": [WEATHER_TOOL]}, "tools"),  # its template has no tools
        (GEMMA, {"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tools"),
        ("fuse", {"tools": [WEATHER_TOOL]}, "tools"),  # no grammar masks fused pieces
        ("fuse", {"response_format": {"type": "json_object"}}, "response_format"),
        (QWEN, {"tool_choice": "required"}, "tool_choice"),  # nothing to call
        (
            QWEN,
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        (QWEN, {"functions": [{"name": "f", "parameters": {}}]}, "functions"),  # deprecated
        (QWEN, {"response_format": {"type": "json_schema"}}, "response_format"),
        (QWEN, {"logit_bias": {"42": 5}}, "logit_bias"),  # still not honoured
    ],
)
def test_refusals_name_the_field(
    client: openai.OpenAI, model: str, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model, messages=ASK_WEATHER, max_tokens=5, extra_body=extra
        )
    assert info.value.body["param"] == param  # type: ignore[index]
