"""Tool calls read out of a vLLM expert's text by vLLM's own tool parsers (`vllm.tool_parsers`,
the classes `vllm serve --tool-call-parser` picks): `extract_tool_calls` for a whole reply,
`extract_tool_calls_streaming` for a streamed one, delta by delta, as vLLM's own server calls
them.

The parser is the expert's `tool_parser` (`hermes` unless the config names another). A call
forced by `tool_choice` is the Hermes frame the grammar writes (`ensemble.structured`), which
is what vLLM itself writes under its default strict tool calling, with `hermes`'s structural
tag; so it is read by `hermes` whatever the expert's parser. The gateway shapes what they read
as it shapes every engine's: ids of its own (`call_...`), `finish_reason` `tool_calls`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ensemble.structured import constraint_of
from ensemble.toolcalls import CallDelta, CallStream, Streamed, new_call_id
from ensemble.types import GenerationRequest, ToolCall

FRAME_PARSER = "hermes"  # reads the frame of a forced call


class VllmToolParsers:
    """An expert's tool parser classes, found in vLLM's `ToolParserManager` and tried on its
    tokenizer once, at load, so that a parser that cannot read this model fails the load."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.tool_parsers import ToolParserManager

        self.name = name
        self.tokenizer = tokenizer
        self.classes: dict[str, type[Any]] = {}
        for parser in dict.fromkeys((name, FRAME_PARSER)):
            try:
                self.classes[parser] = ToolParserManager.get_tool_parser(parser)
                self.classes[parser](tokenizer)
            except Exception as exc:  # an unknown name, or a parser for another tokenizer
                raise ValueError(f"vLLM's tool parser {parser!r} cannot be used: {exc}") from exc

    def reader(self, request: GenerationRequest) -> VllmToolReader:
        """The reader of `request`'s replies: the frame's parser for a forced call, else the
        expert's."""
        constraint = constraint_of(request)
        forced = constraint is not None and constraint.kind == "tool_call"
        parser = self.classes[FRAME_PARSER if forced else self.name]
        return VllmToolReader(parser, self.tokenizer, request)


class VllmToolReader:
    """One request's replies read by one vLLM parser class (`ensemble.toolcalls.ToolCallReader`);
    a new parser object per reply, as vLLM makes one per choice: they keep state."""

    def __init__(self, parser: type[Any], tokenizer: Any, request: GenerationRequest) -> None:
        self.parser = parser
        self._tokenizer = tokenizer
        self._request = chat_request(request)

    def _new(self) -> Any:
        return self.parser(self._tokenizer, self._request.tools)

    def skip_special_tokens(self) -> bool:
        """Whether vLLM may drop special tokens from the text: a parser whose calls are written
        in special tokens says no in its `adjust_request` (`hermes` does, for any tool request)."""
        adjusted = self._new().adjust_request(self._request.model_copy(deep=True))
        return bool(adjusted.skip_special_tokens)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        info = self._new().extract_tool_calls(text, self._request)
        if not info.tools_called or not info.tool_calls:
            return text, []
        calls = [
            ToolCall(new_call_id(), c.function.name, c.function.arguments or "{}")
            for c in info.tool_calls
        ]
        content = info.content
        return (content if content and content.strip() else None), calls

    def stream(self) -> CallStream:
        return _VllmCallStream(self._new(), self._request)


class _VllmCallStream:
    """One streamed reply through one parser object (`ensemble.toolcalls.CallStream`)."""

    def __init__(self, parser: Any, request: Any) -> None:
        self._parser = parser
        self._request = request
        self._text = ""
        self._ids: list[int] = []
        self._calls = 0  # calls begun
        self._named: set[int] = set()

    def push(self, text: str, token_ids: Sequence[int] = ()) -> Streamed:
        if not text and not token_ids:
            return Streamed()
        previous, previous_ids = self._text, self._ids
        self._text, self._ids = previous + text, [*previous_ids, *token_ids]
        delta = self._parser.extract_tool_calls_streaming(
            previous_text=previous,
            current_text=self._text,
            delta_text=text,
            previous_token_ids=previous_ids,
            current_token_ids=self._ids,
            delta_token_ids=list(token_ids),
            request=self._request,
        )
        return self._streamed(delta)

    def finish(self) -> Streamed:
        """What the parser still holds: an engine-based parser's buffer, and the arguments it
        parsed but did not stream (vLLM's server sends both at the end too)."""
        out = Streamed()
        flush = getattr(self._parser, "finish_streaming", None)
        if getattr(self._parser, "engine_based_streaming", False) and flush is not None:
            out = self._streamed(flush())
        rest = self._parser.get_remaining_unstreamed_args() if self._calls else ""
        if rest:
            out = Streamed(out.content, (*out.calls, CallDelta(self._calls - 1, rest)))
        return out

    def _streamed(self, delta: Any) -> Streamed:
        """A vLLM `DeltaMessage` (or None) as content and call fragments, with ids of ours."""
        if delta is None:
            return Streamed()
        fragments: list[CallDelta] = []
        for call in delta.tool_calls or []:
            function = call.function
            name = function.name if function is not None else None
            arguments = (function.arguments if function is not None else None) or ""
            index = int(call.index)
            if index >= self._calls:  # a new call: its first fragment
                self._calls = index + 1
                fragments.append(CallDelta(index, arguments, new_call_id(), name or ""))
                self._named.update([index] if name else [])
            elif name and index not in self._named:  # a name that came after the call began
                self._named.add(index)
                fragments.append(CallDelta(index, arguments, None, name))
            elif arguments:
                fragments.append(CallDelta(index, arguments))
        return Streamed(delta.content or "", tuple(fragments))


def chat_request(request: GenerationRequest) -> Any:
    """What vLLM's parsers read of a request, as vLLM's own `ChatCompletionRequest`: its tools,
    `tool_choice` and `parallel_tool_calls` (not the messages: the prompt is rendered already)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    fields: dict[str, Any] = {
        "messages": [],
        "tools": list(request.tools) or None,
        "tool_choice": request.tool_choice,
    }
    if request.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    return ChatCompletionRequest(**fields)
