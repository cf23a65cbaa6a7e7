"""What a request constrains its output to, as pure values: engines that decode with a grammar
read a `Constraint`; votes compare structured replies by their canonical JSON.

A constraint comes from `response_format` (`json_object`: any JSON object; `json_schema`: that
schema) or from `tool_choice` `required` or a named function: then the output is one
Hermes-style call, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, whose JSON
matches the tool's schema (`ensemble.toolcalls` reads it back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from ensemble.toolcalls import CALL_CLOSE, CALL_OPEN, ToolCallReader
from ensemble.types import GenerationRequest

ConstraintKind = Literal["json", "schema", "tool_call"]

# The request fields an engine or strategy may or may not honour (its `honours`).
TOOLS, RESPONSE_FORMAT = "tools", "response_format"
STRUCTURED = frozenset({TOOLS, RESPONSE_FORMAT})


def needs(request: GenerationRequest) -> list[str]:
    """The structured fields `request` uses, which whoever answers it must honour."""
    return [
        name
        for name, used in (
            (TOOLS, bool(request.tools)),
            (RESPONSE_FORMAT, bool(request.response_format)),
        )
        if used
    ]


@dataclass(frozen=True, slots=True)
class Constraint:
    """`json`: any JSON object; `schema`: JSON matching `schema`; `tool_call`: `CALL_OPEN`,
    JSON matching `schema` (the call: name and arguments), `CALL_CLOSE`.

    `key` is a canonical text of the whole constraint, for grammar caches.
    """

    kind: ConstraintKind
    schema: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{canonical(self.schema)}"

    @property
    def prefix(self) -> str:
        return CALL_OPEN + "\n" if self.kind == "tool_call" else ""

    @property
    def suffix(self) -> str:
        return "\n" + CALL_CLOSE if self.kind == "tool_call" else ""


def constraint_of(request: GenerationRequest) -> Constraint | None:
    """What `request` constrains its output to; None for free text (tool_choice `auto` is
    free text: the model chooses, and calls are parsed out of what it wrote)."""
    choice = request.tool_choice
    if request.tools and choice == "required":
        return Constraint("tool_call", {"anyOf": [call_schema(t) for t in request.tools]})
    if request.tools and isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next(t for t in request.tools if t["function"]["name"] == name)
        return Constraint("tool_call", call_schema(tool))
    fmt = request.response_format
    if fmt is None or fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return Constraint("json")
    return Constraint("schema", fmt["json_schema"].get("schema") or {"type": "object"})


def call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of `tool`: its name, and arguments matching its parameters."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def canonical(value: Any) -> str:
    """One text per JSON value: sorted keys, no spaces (`{"b":1,"a":2}` == `{"a": 2, "b": 1}`)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_reply(text: str, calls: ToolCallReader | None) -> str | None:
    """The canonical form of a structured reply, for votes: its tool calls (names and parsed
    arguments, in order) as `calls` (its expert's reader; None: the request calls no tools)
    reads them, when it made some; else its JSON value; None when it is neither."""
    if calls is not None:
        _, made = calls.parse(text)
        if made:
            try:
                return canonical([[c.name, json.loads(c.arguments)] for c in made])
            except ValueError:  # a parser that passes arguments on unchecked
                return canonical([[c.name, c.arguments] for c in made])
    try:
        return canonical(json.loads(text))
    except ValueError:
        return None
