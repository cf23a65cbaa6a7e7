"""OpenAI response objects as plain dicts (the shapes are fixed, and dict building is cheaper per
chunk than model validation): `chat.completion`, `chat.completion.chunk`, and SSE framing.

A `ResponseShape` is what differs between endpoints (the choices' shape, how many there are, what
opens each streamed choice); `ChatShape` is the chat endpoint's, and
`serving.api.completion_responses.TextCompletionShape` the legacy completions endpoint's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ensemble.toolcalls import CallDelta
from ensemble.types import Piece, TokenLogprob, ToolCall


@dataclass(frozen=True, slots=True)
class Envelope:
    """What every object of one response repeats."""

    id: str
    created: int
    model: str
    object: str = "chat.completion"
    chunk_object: str = "chat.completion.chunk"

    def completion(
        self, choices: list[dict[str, Any]], usage: dict[str, int], chorus: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
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
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        if chorus is not None:
            out["chorus"] = chorus
        return out


class ResponseShape(Protocol):
    """How one endpoint shapes an answer's choices, whole or streamed. Logprobs are passed
    whether or not the client asked for them: the shape knows."""

    @property
    def object(self) -> str:
        """The `object` of a whole answer."""

    @property
    def chunk_object(self) -> str:
        """The `object` of a streamed chunk."""

    @property
    def choices(self) -> int:
        """How many choices the answer has."""

    def choice(
        self,
        index: int,
        text: str | None,
        finish: str,
        logprobs: tuple[TokenLogprob, ...],
        pieces: tuple[Piece, ...],
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> dict[str, Any]: ...

    def opening(self, index: int) -> dict[str, Any] | None:
        """The streamed choice's first chunk, sent before any text (None: none)."""

    def delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: tuple[TokenLogprob, ...],
        pieces: tuple[Piece, ...],
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ChatShape:
    """`chat.completion` choices: a message each, a role chunk first when streamed; with
    `pieces` (the opt-in `chorus_pieces` extension), who chose each stretch of text."""

    choices: int
    logprobs: bool
    pieces: bool = False
    object: str = "chat.completion"
    chunk_object: str = "chat.completion.chunk"

    def choice(
        self,
        index: int,
        text: str | None,
        finish: str,
        logprobs: tuple[TokenLogprob, ...],
        pieces: tuple[Piece, ...],
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> dict[str, Any]:
        return message_choice(
            index,
            text,
            finish,
            logprobs_json(logprobs) if self.logprobs else None,
            pieces_json(pieces) if self.pieces else None,
            tool_calls,
        )

    def opening(self, index: int) -> dict[str, Any] | None:
        return delta_choice(index, {"role": "assistant", "content": ""})

    def delta(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: tuple[TokenLogprob, ...],
        pieces: tuple[Piece, ...],
    ) -> dict[str, Any]:
        content: dict[str, Any] = {"content": text} if text else {}
        if self.pieces and text:  # opt-in: ordinary clients get the standard shape
            content["chorus_pieces"] = pieces_json(pieces)
        return delta_choice(index, content, finish, logprobs if self.logprobs else None)


def message_choice(
    index: int,
    text: str | None,
    finish: str,
    logprobs: list[dict[str, Any]] | None,
    pieces: list[dict[str, Any]] | None = None,
    tool_calls: Sequence[ToolCall] = (),
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in tool_calls
        ]
    if pieces is not None:
        message["chorus_pieces"] = pieces
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
        "finish_reason": finish,
    }


def pieces_json(pieces: tuple[Piece, ...]) -> list[dict[str, Any]]:
    """The `chorus_pieces` extension: each stretch of text and the expert that chose it."""
    return [
        {
            "text": p.text,
            "expert": p.expert,
            "weights": {name: round(w, 4) for name, w in p.weights.items()},
        }
        for p in pieces
    ]


def tool_call_deltas(fragments: Sequence[CallDelta]) -> list[dict[str, Any]]:
    """A choice's call fragments as `delta.tool_calls`, as OpenAI streams them: a call's id,
    type and name first, then its arguments; clients join fragments by their `index`."""
    deltas: list[dict[str, Any]] = []
    for f in fragments:
        call: dict[str, Any] = {"index": f.index}
        if f.id is not None:
            call |= {"id": f.id, "type": "function"}
        name = {} if f.name is None else {"name": f.name}
        call["function"] = name | {"arguments": f.arguments}
        deltas.append({"tool_calls": [call]})
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
