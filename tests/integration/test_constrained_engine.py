"""Constrained decoding on the transformers engine with the real bundled models: whatever the
schema, the output parses and matches it (a property over generated JSON schemas), masks are
per batch row, and a tool call forced by `tool_choice` is a valid Hermes call."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensemble.toolcalls import parse_tool_calls
from ensemble.types import GenerationChunk, GenerationRequest
from serving.engines.transformers.engine import TransformersEngine
from tests.conftest import collect, request, texts

pytestmark = pytest.mark.integration

NAMES = st.sampled_from(["name", "age", "city", "tags", "ok", "score", "kind"])
LEAF = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    st.builds(
        lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 100}, st.integers(-50, 50)
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "number"}),
    st.lists(
        st.sampled_from(["red", "green", "blue", "x y"]), min_size=1, max_size=3, unique=True
    ).map(lambda values: {"enum": values}),
)


def _object(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, dict[str, Any]], n_required: int) -> dict[str, Any]:
        names = sorted(props)
        return {
            "type": "object",
            "properties": props,
            "required": names[:n_required],
            "additionalProperties": False,
        }

    return st.builds(
        build, st.dictionaries(NAMES, children, min_size=1, max_size=3), st.integers(0, 3)
    )


SCHEMAS = st.recursive(
    LEAF,
    lambda children: (
        _object(children)
        | st.builds(
            lambda item, n: {"type": "array", "items": item, "maxItems": n},
            children,
            st.integers(1, 3),
        )
    ),
    max_leaves=4,
)
PROMPT = "Reply with a small JSON value that fits the requested format."


def _with_schema(schema: dict[str, Any], **params: object) -> GenerationRequest:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    return replace(request(PROMPT, **params), response_format=fmt)


def _only(chunks: list[GenerationChunk]) -> tuple[str, str | None]:
    return texts(chunks)[0], chunks[-1].finish_reason


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=SCHEMAS)
def test_constrained_output_always_parses_and_matches_the_schema(
    smollm2: TransformersEngine, schema: dict[str, Any]
) -> None:
    text, finish = _only(collect(smollm2, _with_schema(schema, max_tokens=160, temperature=0.0)))
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_masks_are_per_row_in_one_batch(smollm2: TransformersEngine) -> None:
    """A constrained request and a free one decode in the same batch; only the first is masked,
    and sampled rows (n=3) each follow their own grammar state."""
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    constrained = _with_schema(schema, max_tokens=30, temperature=1.0, n=3, seed=3)
    free = request("What is the capital of France?", max_tokens=12, temperature=0.0)

    async def both() -> tuple[list[GenerationChunk], list[GenerationChunk]]:
        async def run(req: GenerationRequest) -> list[GenerationChunk]:
            return [c async for c in smollm2.generate(req)]

        a, b = await asyncio.gather(run(constrained), run(free))
        return a, b

    masked, plain = asyncio.run(both())
    for text in texts(masked).values():
        jsonschema.validate(json.loads(text), schema)
    assert "Paris" in texts(plain)[0]  # no mask leaked into the other request's row


def test_a_forced_tool_call_is_a_valid_hermes_call(qwen: TransformersEngine) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    }
    req = replace(
        request("What is 2 plus 40?", max_tokens=60, temperature=0.0),
        tools=(tool,),
        tool_choice="required",
    )
    text, finish = _only(collect(qwen, req))
    content, calls = parse_tool_calls(text)
    assert finish == "stop" and content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 2, "b": 40})]
