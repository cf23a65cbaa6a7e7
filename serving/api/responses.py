"""OpenAI response objects as plain dicts (the shapes are fixed, and dict building is cheaper per
chunk than model validation): `chat.completion`, `chat.completion.chunk`, and SSE framing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ensemble.types import TokenLogprob, ToolCall


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every object of one response repeats."""

    id: str
    created: int
    model: str

    def completion(
        self, choices: list[dict[str, Any]], usage: dict[str, int], chorus: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "chorus": chorus,
        }

    def chunk(
        self,
        choices: list[dict[str, Any]],
        *,
        usage: dict[str, int] | None = None,
        chorus: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        if chorus is not None:
            out["chorus"] = chorus
        return out


def message_choice(
    index: int,
    text: str | None,
    finish: str,
    logprobs: list[dict[str, Any]] | None,
    tool_calls: list[ToolCall] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in tool_calls
        ]
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
        "finish_reason": finish,
    }


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """A choice's calls as `delta.tool_calls` fragments, as OpenAI streams them: the id, type
    and name first, then the arguments; clients join fragments by their `index`."""
    deltas: list[dict[str, Any]] = []
    for index, c in enumerate(calls):
        head = {"index": index, "id": c.id, "type": "function"}
        deltas.append({"tool_calls": [head | {"function": {"name": c.name, "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": c.arguments}}]})
    return deltas


def delta_choice(
    index: int,
    delta: dict[str, Any],
    finish: str | None = None,
    logprobs: tuple[TokenLogprob, ...] | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "logprobs": {"content": logprobs_json(logprobs)} if logprobs is not None else None,
        "finish_reason": finish,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


def logprobs_json(items: tuple[TokenLogprob, ...] | None) -> list[dict[str, Any]]:
    return [
        {
            "token": item.token,
            "logprob": item.logprob,
            "bytes": list(item.token.encode("utf-8")),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8"))}
                for t in item.top
            ],
        }
        for item in items or ()
    ]
