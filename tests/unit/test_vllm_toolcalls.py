"""`engine: vllm` experts read tool calls with vLLM's own parser classes
(`serving.engines.vllm.toolcalls`), on the bundled Qwen2.5's real tokenizer: whole and
streamed token by token, the parser the config names, the `hermes` one for a forced call's
frame, and through the gateway as the OpenAI SDK reads it. No model runs here (a real vLLM
expert: `tests/integration/test_vllm_tools.py`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ensemble.errors import ExpertFailed
from ensemble.toolcalls import CallDelta, Streamed
from ensemble.types import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from serving.config import VllmExpertConfig, load_config
from serving.http.app import create_app
from serving.models import bundled

pytest.importorskip("vllm.tool_parsers")

from serving.engines.vllm.engine import VllmEngine
from serving.engines.vllm.toolcalls import VllmToolParsers, VllmToolReader

QWEN = "bundled:qwen2.5-coder-0.5b-instruct"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
REQUEST = GenerationRequest(
    "r", (ChatMessage("user", "hi"),), SamplingParams(), tools=(TOOL,), tool_choice="auto"
)
REQUIRED = replace(REQUEST, tool_choice="required")


def hermes(city: str) -> str:
    body = {"name": "get_weather", "arguments": {"city": city}}
    return f"<tool_call>\n{json.dumps(body)}\n</tool_call>"


TWO_CALLS = "Let me check.\n" + hermes("Paris") + "\n" + hermes("Rome")
PYTHONIC = '[get_weather(city="Paris")]'


@cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled.resolve(QWEN))


def tokens(text: str) -> list[tuple[str, int]]:
    """`text` as Qwen's tokens: each one's text and id, as vLLM streams them."""
    ids = tokenizer().encode(text)
    out, before = [], ""
    for i in range(len(ids)):
        now = tokenizer().decode(ids[: i + 1])
        out.append((now[len(before) :], ids[i]))
        before = now
    assert "".join(t for t, _ in out) == text
    return out


def streamed(reader: VllmToolReader, text: str) -> list[Streamed]:
    stream = reader.stream()
    return [stream.push(piece, [i]) for piece, i in tokens(text)] + [stream.finish()]


def joined(steps: list[Streamed]) -> tuple[str, dict[int, dict[str, str]]]:
    """The content and the calls (`index` -> id, name, arguments) a client assembles."""
    content, calls = "", {}
    for step in steps:
        content += step.content
        for f in step.calls:
            call = calls.setdefault(f.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += f.id or ""
            call["name"] += f.name or ""
            call["arguments"] += f.arguments
    return content, calls


def test_hermes_reads_whole_replies_as_vllm_serve_does() -> None:
    reader = VllmToolParsers("hermes", tokenizer()).reader(REQUEST)
    assert reader.parser.__name__ == "Hermes2ProToolParser"
    content, calls = reader.parse(TWO_CALLS)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert reader.parse("no call here") == ("no call here", [])


def test_hermes_streams_arguments_as_they_are_written() -> None:
    reader = VllmToolParsers("hermes", tokenizer()).reader(REQUEST)
    steps = streamed(reader, TWO_CALLS)
    content, calls = joined(steps)
    assert content == "Let me check.\n"
    whole = reader.parse(TWO_CALLS)[1]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.name, c.arguments) for c in whole
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())
    # vLLM's parser sends each call's name as soon as it is known, then its arguments piece by
    # piece while the model writes them (Chorus's own reader holds a call until it ends).
    first = [f for s in steps for f in s.calls if f.index == 0]
    assert first[0] == CallDelta(0, "", first[0].id, "get_weather")
    assert len([f for f in first if f.arguments]) > 3
    calls_at = [i for i, s in enumerate(steps) if s.calls]
    assert calls_at[0] < len(steps) - 10  # long before the reply ends


def test_the_configured_parser_reads_its_own_format() -> None:
    pythonic = VllmToolParsers("pythonic", tokenizer())
    reader = pythonic.reader(REQUEST)
    assert reader.parser.__name__ == "PythonicToolParser"
    _, calls = reader.parse(PYTHONIC)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    content, calls = joined(streamed(reader, PYTHONIC))
    assert not content and [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert reader.parse(hermes("Paris")) == (hermes("Paris"), [])  # not its format: content
    # A forced call is the Hermes frame its grammar writes: `hermes` reads it, whatever the
    # expert's parser.
    forced = pythonic.reader(REQUIRED)
    assert forced.parser.__name__ == "Hermes2ProToolParser"
    assert [c.name for c in forced.parse(hermes("Paris"))[1]] == ["get_weather"]


def test_hermes_keeps_special_tokens_in_tool_requests() -> None:
    assert VllmToolParsers("hermes", tokenizer()).reader(REQUEST).skip_special_tokens() is False


def test_a_parser_that_cannot_read_the_model_fails_its_load_before_vllm_starts(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="'jamba' cannot be used"):
        VllmToolParsers("jamba", tokenizer())  # Jamba's call tokens are not in Qwen's vocabulary
    path = tmp_path / "c.yaml"
    path.write_text(f"experts:\n  q: {{engine: vllm, model: '{QWEN}', tool_parser: jamba}}\n")
    config = load_config(path).experts["q"]
    assert isinstance(config, VllmExpertConfig)
    engine = VllmEngine("q", config)
    with pytest.raises(ExpertFailed, match="expert q: tool_parser: vLLM's tool parser 'jamba'"):
        asyncio.run(engine.start())
    assert engine.llm is None  # refused before vLLM's engine was built


class TokenStreamEngine:
    """An expert that streams a given reply token by token (with Qwen's token ids), and reads
    its calls with vLLM's parser: the gateway's side of a vLLM expert, with no model."""

    ready = True
    context_window = 1024
    honours = frozenset({"tools", "response_format"})

    def __init__(self, name: str, reply: str, parser: str) -> None:
        self.name = name
        self.reply = reply
        self.parsers = VllmToolParsers(parser, tokenizer())

    def tool_reader(self, request: GenerationRequest) -> VllmToolReader:
        return self.parsers.reader(request)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        del request  # the reply is scripted
        pieces = tokens(self.reply)
        for n, (text, token_id) in enumerate(pieces):
            last = n == len(pieces) - 1
            finish = "stop" if last else None
            yield GenerationChunk(
                self.name, 0, text, 1, 5, finish_reason=finish, token_ids=(token_id,)
            )


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    path = tmp_path / "c.yaml"
    path.write_text(f"experts:\n  q: {{model: '{QWEN}'}}\n  p: {{model: '{QWEN}'}}\n")
    engines = {
        "q": TokenStreamEngine("q", TWO_CALLS, "hermes"),
        "p": TokenStreamEngine("p", PYTHONIC, "pythonic"),
    }
    return TestClient(create_app(load_config(path), engines=engines))


def post(client: TestClient, model: str, stream: bool, **extra: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]}
    response = client.post("/v1/chat/completions", json=body | {"stream": stream} | extra)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()
    return [json.loads(e[6:]) for e in response.text.split("\n\n") if e.startswith("data: {")]


@pytest.mark.parametrize("parallel", [None, False])
def test_the_gateway_serves_vllm_parsed_calls_in_the_openai_shape(
    client: TestClient, parallel: bool | None
) -> None:
    import openai.lib.streaming.chat as sdk_stream
    from openai.types.chat import ChatCompletionChunk

    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    with client:
        whole = post(client, "q", False, **extra)["choices"][0]
        events = post(client, "q", True, **extra)
    cities = ["Paris"] if parallel is False else ["Paris", "Rome"]
    assert whole["finish_reason"] == "tool_calls"
    assert whole["message"]["content"] == "Let me check.\n"
    assert [
        json.loads(c["function"]["arguments"])["city"] for c in whole["message"]["tool_calls"]
    ] == cities
    assert all(
        c["id"].startswith("call_") and c["type"] == "function"
        for c in whole["message"]["tool_calls"]
    )
    # The SDK's own accumulator assembles the streamed fragments into the same message.
    state = sdk_stream.ChatCompletionStreamState()
    for event in events:
        state.handle_chunk(ChatCompletionChunk.model_validate(event))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    calls = choice.message.tool_calls or []
    assert [json.loads(c.function.arguments)["city"] for c in calls] == cities
    assert all(c.id.startswith("call_") for c in calls)
    fragments = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls", [])]
    assert len(fragments) > 2 * len(cities)  # arguments in pieces, as they were written


def test_the_configured_parser_decides_what_the_gateway_reads(client: TestClient) -> None:
    with client:
        for stream in (False, True):
            read = post(client, "p", stream)
            if stream:
                calls = [
                    d for e in read for c in e["choices"] for d in c["delta"].get("tool_calls", [])
                ]
                assert calls[0]["function"]["name"] == "get_weather"
                assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {
                    "city": "Paris"
                }
                assert read[-1]["choices"][0]["finish_reason"] == "tool_calls"
            else:
                (call,) = read["choices"][0]["message"]["tool_calls"]
                assert call["function"]["name"] == "get_weather"
        none = post(client, "p", False, tool_choice="none")["choices"][0]
        assert none["message"] == {"role": "assistant", "content": PYTHONIC}
        assert none["finish_reason"] == "stop"
