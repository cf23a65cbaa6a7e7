"""The one validation stage: a chat request's raw body and the server's limits in, a
`ChatRequest` out, or an `InvalidRequestError` (400) that names the field.

The body's shape and ranges are the wire models' (`serving.api.protocol`, pydantic); what
depends on the operator's limits is checked here; what depends on the pool asked for (its
strategy's `n`, whether it can serve now) is the gateway's (`serving.gateway.service`).
Everything after this stage reads the `ChatRequest`, never the body.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from ensemble.types import ChatMessage, GenerationRequest, SamplingParams, ToolCall
from serving.api.errors import InvalidRequestError
from serving.api.protocol import ChatCompletionRequest, Message
from serving.config import ServerConfig, key_path


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat request that passed validation: what to generate and how to answer."""

    model: str
    generation: GenerationRequest
    stream: bool
    include_usage: bool  # stream a usage chunk before [DONE]
    quality_weight: float | None = None  # None: the pool's own
    pieces: bool = False  # `chorus_pieces`: say which expert chose each piece of text
    max_cost: float | None = None  # in the pool's cost unit; None: no limit

    @property
    def id(self) -> str:
        return self.generation.request_id

    @property
    def n(self) -> int:
        return self.generation.params.n

    @property
    def logprobs(self) -> bool:
        return self.generation.params.logprobs


QUALITY_WEIGHT_HEADER = "x-chorus-quality-weight"
MAX_COST_HEADER = "x-chorus-max-cost"


def validate_chat(
    raw: bytes, limits: ServerConfig, headers: Mapping[str, str] | None = None
) -> ChatRequest:
    """Parse and check a request body (and Chorus's request headers); `InvalidRequestError`
    names the field."""
    try:
        body = ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None
    chat = _within_limits(body, limits)
    if chat.quality_weight is None:  # the body's fields win
        chat = replace(chat, quality_weight=header_quality_weight(headers))
    if chat.max_cost is None:
        chat = replace(chat, max_cost=header_max_cost(headers))
    return chat


def header_quality_weight(headers: Mapping[str, str] | None) -> float | None:
    """The `x-chorus-quality-weight` header's value, if sent; a 400 if it is not in [0, 1]."""
    header = (headers or {}).get(QUALITY_WEIGHT_HEADER)
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise InvalidRequestError(
            f"header `{QUALITY_WEIGHT_HEADER}` must be a number in [0, 1]",
            param=QUALITY_WEIGHT_HEADER,
        )
    return value


def header_max_cost(headers: Mapping[str, str] | None) -> float | None:
    """The `x-chorus-max-cost` header's value, if sent; a 400 if it is not a finite number
    >= 0."""
    header = (headers or {}).get(MAX_COST_HEADER)
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InvalidRequestError(
            f"header `{MAX_COST_HEADER}` must be a finite number >= 0, in the pool's cost unit",
            param=MAX_COST_HEADER,
        )
    return value


def invalid_request(errors: Sequence[Any]) -> InvalidRequestError:
    """The first problem pydantic found, as OpenAI clients expect it (never FastAPI's 422).
    FastAPI's location prefixes (`body`, `query`) are not part of the field's name."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequestError("The request body is not valid JSON.")
    loc = [part for part in first.get("loc", ()) if part not in ("body", "query")]
    param = key_path(loc) or None
    message = first.get("msg", "invalid request")
    return InvalidRequestError(f"{param}: {message}" if param else message, param=param)


# OpenAI request fields that change what the client gets back and that Chorus does not honour
# yet: refused with a 400 naming the field, never ignored, unless they hold the value that asks
# for nothing (an empty list, a zero penalty, plain text). Fields that only label or bill the
# request (`metadata`, `store`, `user`, `safety_identifier`, `prompt_cache_key`,
# `prompt_cache_options`, `prompt_cache_retention`, `service_tier`) and a vendor's extensions are
# ignored, as vLLM does: they change nothing in the answer (tests/unit/test_field_walk.py).
# (`tools`, `tool_choice`, `parallel_tool_calls` and `response_format` are honoured: whether the
# pool and its experts can is the gateway's check, `serving.gateway.capabilities`.)
NOT_HONOURED: dict[str, tuple[object, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    # These change the output of reasoning models (how long they think, how much they write);
    # no expert here takes them, so a value is refused rather than dropped.
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "moderation": (None,),  # moderation of input and output: Chorus runs none
}


def refuse_what_is_not_honoured(
    extra: Mapping[str, Any], not_honoured: Mapping[str, tuple[object, ...]]
) -> None:
    """A 400 naming the first field of `not_honoured` that `extra` (a body's fields beyond its
    wire model) holds with a value other than a harmless one."""
    for name, harmless in not_honoured.items():
        if name in extra and extra[name] not in harmless:
            raise InvalidRequestError(
                f"`{name}` is not supported by Chorus yet; leave it out", param=name
            )


def _within_limits(body: ChatCompletionRequest, limits: ServerConfig) -> ChatRequest:
    refuse_what_is_not_honoured(body.model_extra or {}, NOT_HONOURED)
    stop = body.stop_list()
    if body.n > limits.max_n:
        raise InvalidRequestError(f"`n` must be at most {limits.max_n}", param="n")
    if len(stop) > limits.max_stop:
        raise InvalidRequestError(
            f"at most {limits.max_stop} stop sequences are allowed", param="stop"
        )
    if len(body.messages) > limits.max_messages:
        raise InvalidRequestError(
            f"at most {limits.max_messages} messages are allowed", param="messages"
        )
    if (body.top_logprobs or 0) > limits.max_top_logprobs:
        raise InvalidRequestError(
            f"`top_logprobs` must be at most {limits.max_top_logprobs}", param="top_logprobs"
        )
    params = SamplingParams(
        max_tokens=body.completion_limit(),
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=tuple(stop),
        seed=body.seed,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
    )
    _check_tools(body)
    messages = tuple(_message(m) for m in body.messages)
    generation = GenerationRequest(
        f"chatcmpl-{uuid.uuid4().hex}",
        messages,
        params,
        body.answer_format,
        tools=body.tool_dicts(),
        tool_choice=body.tool_choice_value(),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=body.response_format_value(),
    )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return ChatRequest(
        body.model,
        generation,
        body.stream,
        include_usage,
        body.quality_weight,
        body.chorus_pieces,
        body.max_cost,
    )


def _check_tools(body: ChatCompletionRequest) -> None:
    """`tool_choice` must name something there is: a tool to require, a tool of that name."""
    names = [t.function.name for t in body.tools or ()]
    choice = body.tool_choice
    if choice is not None and choice != "none" and not names:
        raise InvalidRequestError(
            f"`tool_choice` {choice!r} needs `tools`"
            if isinstance(choice, str)
            else "`tool_choice` names a function, but there are no `tools`",
            param="tool_choice",
        )
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        raise InvalidRequestError(
            f"`tool_choice` names `{choice.function.name}`, which is not one of the `tools`",
            param="tool_choice",
        )
    if len(set(names)) < len(names):
        raise InvalidRequestError("two `tools` have the same name", param="tools")


def _message(message: Message) -> ChatMessage:
    calls = tuple(
        ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()
    )
    return ChatMessage(message.role, message.text(), calls, message.tool_call_id)
