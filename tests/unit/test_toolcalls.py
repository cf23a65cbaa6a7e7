"""Pure logic of tools and structured outputs: the Hermes reader (whole and streamed), the
constraint a request asks for, canonical JSON for votes, and who honours what."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemble.structured import Constraint, canonical, canonical_reply, constraint_of, needs
from ensemble.toolcalls import (
    HERMES,
    CallDelta,
    Streamed,
    ToolCallStream,
    allowed_calls,
    allowed_deltas,
    parse_tool_calls,
    tool_reader,
)
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.api.errors import InvalidRequestError
from serving.gateway.capabilities import able
from tests.fakes import FakeEngine

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
REQUEST = GenerationRequest("r", (ChatMessage("user", "hi"),), SamplingParams())
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_hermes_calls_are_read_with_the_content_before_them() -> None:
    content, calls = parse_tool_calls("Let me check.\n" + CALL + CALL.replace("Paris", "Rome"))
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_no_content_is_none_and_an_unclosed_call_still_counts() -> None:
    content, calls = parse_tool_calls(CALL.removesuffix("</tool_call>"))
    assert content is None and calls[0].name == "get_weather"


@pytest.mark.parametrize(
    "text", ["plain answer", "<tool_call>{not json}</tool_call>", "<tool_call>[1]"]
)
def test_text_that_is_no_valid_call_stays_content(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])


@given(st.lists(st.integers(1, 9), min_size=1, max_size=30), st.sampled_from(["Sure. ", ""]))
def test_the_stream_reader_agrees_with_the_whole_reader_however_text_is_split(
    cuts: list[int], lead: str
) -> None:
    text = lead + CALL
    reader, sent, at = ToolCallStream(), "", 0
    for size in cuts:
        sent += reader.push(text[at : at + size]).content
        at += size
    sent += reader.push(text[at:]).content
    tail = reader.finish()
    content, expected = parse_tool_calls(text)
    assert sent + tail.content == (content or "")
    heads = [(f.name, f.id) for f in tail.calls if f.id is not None]
    assert [name for name, _ in heads] == [c.name for c in expected]
    assert all(call_id is not None and call_id.startswith("call_") for _, call_id in heads)
    arguments = [f.arguments for f in tail.calls if f.id is None]
    assert arguments == [c.arguments for c in expected]  # each call's arguments whole


def test_the_stream_reader_holds_only_what_could_start_a_call() -> None:
    reader = ToolCallStream()
    assert reader.push("a <tool").content == "a "
    assert reader.push("box>").content == "<toolbox>"  # not a call after all
    assert reader.finish() == Streamed()


def test_constraints_follow_tool_choice_then_response_format() -> None:
    tools = replace(REQUEST, tools=(TOOL,))
    assert constraint_of(tools) is None  # auto: free text, calls parsed
    required = constraint_of(replace(tools, tool_choice="required"))
    assert required is not None and required.kind == "tool_call"
    named = constraint_of(
        replace(tools, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    )
    assert named is not None and named.schema is not None
    assert named.schema["properties"]["name"] == {"const": "get_weather"}
    assert named.prefix == "<tool_call>\n" and named.suffix == "\n</tool_call>"
    assert constraint_of(replace(REQUEST, response_format={"type": "json_object"})) == Constraint(
        "json"
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert constraint_of(replace(REQUEST, response_format=fmt)) == Constraint("schema", schema)


def test_votes_compare_canonical_json() -> None:
    assert canonical_reply('{"b": 1, "a": [1, 2]}', None) == canonical_reply(
        '{ "a":[1,2],"b":1 }', None
    )
    assert canonical_reply("not json", None) is None
    assert canonical_reply(CALL, HERMES) == canonical([["get_weather", {"city": "Paris"}]])


def test_a_request_goes_only_to_experts_that_honour_what_it_uses() -> None:
    plain, tooled = FakeEngine("plain", ["x"]), FakeEngine("tooled", ["x"])
    tooled.honours = frozenset({"tools", "response_format"})  # type: ignore[attr-defined]
    request = replace(REQUEST, tools=(TOOL,))
    assert needs(request) == ["tools"] and needs(REQUEST) == []
    assert able("auto", [plain, tooled], [plain, tooled], request) == [tooled]
    assert able("auto", [plain], [plain, tooled], request) == [tooled]  # not routed, but able
    assert able("auto", [plain], [plain], REQUEST) == [plain]
    with pytest.raises(InvalidRequestError) as info:
        able("plain", [plain], [plain], request)
    assert info.value.param == "tools"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    _, calls = parse_tool_calls(CALL + CALL.replace("Paris", "Rome"))
    assert allowed_calls(calls, False) == calls[:1]
    assert allowed_calls(calls, None) == allowed_calls(calls, True) == calls
    fragments = [CallDelta(0, "", "call_a", "f"), CallDelta(0, "{}"), CallDelta(1, "", "call_b")]
    assert allowed_deltas(fragments, False) == fragments[:2]
    assert allowed_deltas(fragments, None) == fragments


def test_an_engine_without_a_reader_of_its_own_is_read_as_hermes() -> None:
    assert tool_reader(FakeEngine("plain", ["x"]), REQUEST) is HERMES
    assert tool_reader(None, REQUEST) is HERMES
