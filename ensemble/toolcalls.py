"""Tool calls read out of generated text, as vLLM's Hermes parser reads them.

A model that calls a tool writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(Qwen2.5's and Hermes' templates ask for it). The text before the first call is the message's
content; each call's JSON becomes a `ToolCall` with a fresh id. When a call is not valid JSON,
the whole text stays content and there are no calls (vLLM does the same), so nothing is lost.
"""

from __future__ import annotations

import json
import re
import uuid

from ensemble.types import ToolCall

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_CALLS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The content (None when there is none) and the calls of a whole reply."""
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


class ToolCallStream:
    """One sample's text as it streams: content is released as soon as it cannot be the start
    of a call; from the first `<tool_call>` on, text is held until the end, when it is parsed
    (`finish`)."""

    def __init__(self) -> None:
        self._held = ""
        self._calling = False
        self._sent = ""

    def push(self, text: str) -> str:
        """Add streamed text; return the content that is safe to send now."""
        self._held += text
        if self._calling:
            return ""
        if CALL_OPEN in self._held:
            self._calling = True
            out, self._held = self._held.split(CALL_OPEN, 1)
            self._held = CALL_OPEN + self._held
            return self._send(out)
        keep = _partial_open(self._held)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return self._send(out)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The sample ended: the content still to send, and its calls."""
        held, self._held = self._held, ""
        if not self._calling:
            return self._send(held), []
        _, calls = parse_tool_calls(self._sent + held)
        if not calls:  # not a valid call: the text is content, as in `parse_tool_calls`
            return self._send(held), []
        return "", calls

    def _send(self, text: str) -> str:
        self._sent += text
        return text


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
