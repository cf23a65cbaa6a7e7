"""Tool calls read out of generated text: the seam every engine reads its calls through, and
Chorus's own Hermes reader behind it.

A model that calls a tool writes it in its own format; an engine says how its text is read
with `tool_reader(request)` (a `ToolCallReader`: a whole reply, or a reader per streamed sample).
`engine: vllm` experts read with vLLM's own tool parsers (`serving.engines.vllm.toolcalls`);
the others (and any engine without a `tool_reader`) with Chorus's Hermes reader here.

The Hermes format is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5's and
Hermes' templates ask for it, and a forced call's grammar writes it, `ensemble.structured`).
The text before the first call is the message's content; each call's JSON becomes a `ToolCall`
with a fresh id. When a call is not valid JSON, the whole text stays content and there are no
calls (vLLM's `hermes` parser does the same), so nothing is lost.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ensemble.types import GenerationRequest, ToolCall

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_CALLS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class CallDelta:
    """A fragment of a streamed call, as OpenAI streams them: a call's first fragment has its
    `id` (and its `name`); the following ones add to its `arguments` (JSON text, joined by
    `index`, the call's place in the message)."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Streamed:
    """What a streamed sample's reader lets out at one step: content to send now, and call
    fragments."""

    content: str = ""
    calls: tuple[CallDelta, ...] = ()


class CallStream(Protocol):
    """One sample's text as it streams, read for tool calls."""

    def push(self, text: str, token_ids: Sequence[int] = ()) -> Streamed:
        """Add the sample's next text (and its token ids, where the engine has them)."""
        ...

    def finish(self) -> Streamed:
        """The sample ended: what is still to send."""
        ...


class ToolCallReader(Protocol):
    """How an expert's replies to one request are read for tool calls."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content (None when there is none) and the calls of a whole reply."""
        ...

    def stream(self) -> CallStream:
        """A reader for one sample as it streams."""
        ...


class HermesReader:
    """Chorus's own Hermes reader (`ToolCallReader`)."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return parse_tool_calls(text)

    def stream(self) -> CallStream:
        return ToolCallStream()


HERMES = HermesReader()


def tool_reader(engine: object, request: GenerationRequest) -> ToolCallReader:
    """How `engine` (an expert, or None) reads tool calls for `request`: its own
    `tool_reader`, else Chorus's Hermes reader."""
    make = getattr(engine, "tool_reader", None)
    if make is None:
        return HERMES
    reader: ToolCallReader = make(request)
    return reader


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The content (None when there is none) and the Hermes calls of a whole reply."""
    if CALL_OPEN not in text:
        return text, []
    calls: list[ToolCall] = []
    try:
        for match in _CALLS.finditer(text):
            body = json.loads(match.group(1) if match.group(1) is not None else match.group(2))
            if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                return text, []
            arguments = body.get("arguments", body.get("parameters", {}))
            calls.append(
                ToolCall(new_call_id(), body["name"], json.dumps(arguments, ensure_ascii=False))
            )
    except ValueError:
        return text, []
    content = text[: text.index(CALL_OPEN)]
    return (content if content.strip() else None), calls


def allowed_calls(calls: list[ToolCall], parallel: bool | None) -> list[ToolCall]:
    """`parallel_tool_calls: false` keeps the first call only (as vLLM does); otherwise all."""
    return calls[:1] if parallel is False else calls


def allowed_deltas(deltas: Sequence[CallDelta], parallel: bool | None) -> list[CallDelta]:
    """The same for streamed fragments: the first call's only, or all."""
    return [d for d in deltas if d.index == 0] if parallel is False else list(deltas)


def whole_calls(calls: Sequence[ToolCall]) -> tuple[CallDelta, ...]:
    """Whole calls as stream fragments: each call's id and name, then its arguments."""
    out: list[CallDelta] = []
    for index, call in enumerate(calls):
        out += [CallDelta(index, "", call.id, call.name), CallDelta(index, call.arguments)]
    return tuple(out)


class ToolCallStream:
    """Chorus's Hermes reader of one streamed sample (`CallStream`): content is released as
    soon as it cannot be the start of a call; from the first `<tool_call>` on, text is held
    until the end, when it is parsed and its calls are sent whole (`finish`)."""

    def __init__(self) -> None:
        self._held = ""
        self._calling = False
        self._sent = ""

    def push(self, text: str, token_ids: Sequence[int] = ()) -> Streamed:
        """Add streamed text; the content that is safe to send now."""
        del token_ids  # the Hermes frame is text
        self._held += text
        if self._calling:
            return Streamed()
        if CALL_OPEN in self._held:
            self._calling = True
            out, self._held = self._held.split(CALL_OPEN, 1)
            self._held = CALL_OPEN + self._held
            return self._send(out)
        keep = _partial_open(self._held)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return self._send(out)

    def finish(self) -> Streamed:
        """The sample ended: the content still to send, and its calls."""
        held, self._held = self._held, ""
        if not self._calling:
            return self._send(held)
        _, calls = parse_tool_calls(self._sent + held)
        if not calls:  # not a valid call: the text is content, as in `parse_tool_calls`
            return self._send(held)
        return Streamed(calls=whole_calls(calls))

    def _send(self, text: str) -> Streamed:
        self._sent += text
        return Streamed(text)


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
