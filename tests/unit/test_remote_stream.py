"""The `openai` engine reads each upstream stream to its end, so its connection is reused; an
upstream that streams something other than OpenAI's chunks is a failed expert."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from ensemble.errors import ExpertFailed
from ensemble.strategy import SingleStrategy
from ensemble.types import ChatMessage, EnsembleTrace, GenerationRequest, SamplingParams
from serving.config import OpenAIExpertConfig
from serving.engines.openai.engine import RemoteOpenAIEngine
from tests.upstream import Handler, serve


def test_stream_is_read_past_done_and_its_connection_reused() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        if request.method == "GET":  # the health probe
            return web.json_response({"data": []})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in (chunk, usage):
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(0.05)  # the end of the body arrives after [DONE]
        await response.write_eof()
        return response

    request = GenerationRequest("r", (ChatMessage("user", "hello"),), SamplingParams(max_tokens=4))

    async def run() -> list[str]:
        async with serve(handler) as url:
            config = OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model="m")
            engine = RemoteOpenAIEngine("up", config)
            await engine.start()
            try:
                return ["".join([c.text async for c in engine.generate(request)]) for _ in range(3)]
            finally:
                await engine.aclose()

    assert asyncio.run(run()) == ["Hi"] * 3
    assert len(peers) == 1  # the probe and three streams over one connection


REQUEST = GenerationRequest("r", (ChatMessage("user", "hello"),), SamplingParams(max_tokens=4))


def streaming(*lines: bytes) -> Handler:
    """An upstream that streams `lines` (then `[DONE]`) to every completion request."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":  # the health probe
            return web.json_response({"data": []})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for line in (*lines, b"data: [DONE]"):
            await response.write(line + b"\n\n")
        await response.write_eof()
        return response

    return handler


def event(value: object) -> bytes:
    return b"data: " + json.dumps(value).encode()


HI = event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})
TOKEN = {"token": "Hi", "logprob": -0.1, "top_logprobs": []}


def with_logprob(item: object) -> bytes:
    return event({"choices": [{"index": 0, "logprobs": {"content": [item]}}]})


@pytest.mark.parametrize(
    ("line", "wrong"),
    [
        (b"data: {not json", "not JSON"),
        (b'data: {"choices": [', "not JSON"),
        (event({"choices": [{"delta": {"content": "Hi"}}]}), "no 'index' field"),
        (event({"choices": ["Hi"]}), "a choice is a JSON str, not an object"),
        (event({"choices": [{"index": 0, "delta": "Hi"}]}), "`delta` is a JSON str"),
        (
            event({"choices": [{"index": 0, "delta": {"content": 7}}]}),
            "`content` is a JSON int, not text",
        ),
        (with_logprob({"logprob": -0.1}), "no 'token' field"),
        (with_logprob({**TOKEN, "top_logprobs": [{"token": "a"}]}), "no 'logprob' field"),
        (with_logprob({**TOKEN, "logprob": None}), "NoneType"),
        (event({"choices": [{"index": None, "delta": {"content": "Hi"}}]}), "NoneType"),
        (event({"choices": [], "usage": 3}), "`usage` is a JSON int"),
        (event([1, 2]), "the event is a JSON list, not an object"),
    ],
)
def test_a_malformed_stream_is_a_failed_expert_naming_what_was_wrong(
    line: bytes, wrong: str
) -> None:
    async def run() -> list[str]:
        async with serve(streaming(HI, line)) as url:
            config = OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model="m")
            engine = RemoteOpenAIEngine("up", config)
            await engine.start()
            got: list[str] = []
            try:
                with pytest.raises(ExpertFailed) as failed:
                    async for chunk in engine.generate(REQUEST):
                        got.append(chunk.text)
            finally:
                await engine.aclose()
            assert "expert up sent a malformed stream event" in failed.value.message
            assert wrong in failed.value.message
            return got

    assert asyncio.run(run()) == ["Hi"]  # what came before the bad line was passed on


def test_an_expert_that_streams_nonsense_before_any_output_falls_back_to_the_next() -> None:
    async def run() -> tuple[str, EnsembleTrace]:
        async with (
            serve(streaming(b"data: <html>")) as bad,
            serve(streaming(HI)) as good,
        ):
            engines = [
                RemoteOpenAIEngine(
                    name, OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model="m")
                )
                for name, url in (("bad", bad), ("good", good))
            ]
            for engine in engines:
                await engine.start()
            trace = EnsembleTrace()
            try:
                chunks = [c async for c in SingleStrategy().run(REQUEST, engines, trace)]
            finally:
                for engine in engines:
                    await engine.aclose()
            return "".join(c.text for c in chunks), trace

    text, trace = asyncio.run(run())
    assert text == "Hi"
    assert trace.failed == ["bad"] and trace.experts == ["good"]


def test_tools_and_response_format_pass_through_and_streamed_calls_come_back() -> None:
    """`tools`, `tool_choice`, `parallel_tool_calls` and `response_format` reach the server
    untouched (and the conversation's calls and results); its `delta.tool_calls` fragments come
    back as one Hermes call that the gateway's reader parses."""
    from dataclasses import replace

    from ensemble.toolcalls import parse_tool_calls
    from ensemble.types import ToolCall

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    fmt = {"type": "json_object"}
    fragments = [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"x": '}},
        {"index": 0, "function": {"arguments": "1}"}},
    ]
    events = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [f]}, "finish_reason": None}]}
        for f in fragments
    ] + [{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    seen: list[dict[str, object]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.json_response({"data": []})
        seen.append(await request.json())
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    messages = (
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "", (ToolCall("c0", "f", '{"x": 0}'),)),
        ChatMessage("tool", "42", tool_call_id="c0"),
    )
    request = replace(
        GenerationRequest("r", messages, SamplingParams(max_tokens=4)),
        tools=(tool,),
        tool_choice="required",
        parallel_tool_calls=False,
        response_format=fmt,
    )

    async def run() -> str:
        async with serve(handler) as url:
            config = OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model="m")
            engine = RemoteOpenAIEngine("up", config)
            await engine.start()
            try:
                return "".join([c.text async for c in engine.generate(request)])
            finally:
                await engine.aclose()

    text = asyncio.run(run())
    body = seen[0]
    assert body["tools"] == [tool] and body["tool_choice"] == "required"
    assert body["parallel_tool_calls"] is False and body["response_format"] == fmt
    assert body["messages"][1]["tool_calls"][0]["function"] == {
        "name": "f",
        "arguments": '{"x": 0}',
    }  # type: ignore[index]
    assert body["messages"][2]["tool_call_id"] == "c0"  # type: ignore[index]
    _, calls = parse_tool_calls(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]
