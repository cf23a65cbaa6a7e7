"""The legacy completions API's validation stage: a `POST /v1/completions` body and the
server's limits in, a `CompletionRequest` out, or an `InvalidRequestError` (400) naming the
field. The limits are the chat endpoint's (`serving.api.validation`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from ensemble.types import GenerationRequest, SamplingParams
from serving.api.completion_protocol import DEFAULT_MAX_TOKENS, CompletionRequestBody
from serving.api.completion_responses import TextCompletionShape
from serving.api.errors import InvalidRequestError
from serving.api.validation import (
    ChatRequest,
    header_max_cost,
    header_quality_weight,
    invalid_request,
    refuse_what_is_not_honoured,
)
from serving.config import ServerConfig


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A completions request that passed validation. `chat` is what the gateway serves (model,
    streaming, usage, quality weight; its generation is the first prompt's); `prompts` holds one
    generation per prompt."""

    chat: ChatRequest
    prompts: tuple[GenerationRequest, ...]
    echo: bool
    logprobs: int | None  # None: not asked for

    def shape(self) -> TextCompletionShape:
        """The response's shape; a new one per response (a stream's text offsets are state)."""
        texts = tuple(p.prompt or "" for p in self.prompts)
        return TextCompletionShape(texts, self.chat.n, self.echo, self.logprobs is not None)


# Completions fields that change what the client gets back and that Chorus does not honour:
# refused with a 400 naming the field, unless they hold the value that asks for nothing.
NOT_HONOURED: dict[str, tuple[object, ...]] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


def validate_completion(
    raw: bytes, limits: ServerConfig, headers: Mapping[str, str] | None = None
) -> CompletionRequest:
    try:
        body = CompletionRequestBody.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None
    refuse_what_is_not_honoured(body.model_extra or {}, NOT_HONOURED)
    prompts, stop = body.prompts(), body.stop_list()
    if body.n > limits.max_n:
        raise InvalidRequestError(f"`n` must be at most {limits.max_n}", param="n")
    if len(stop) > limits.max_stop:
        raise InvalidRequestError(
            f"at most {limits.max_stop} stop sequences are allowed", param="stop"
        )
    # Prompts are answered one after another, so their number is bounded like messages.
    if len(prompts) > limits.max_messages:
        raise InvalidRequestError(
            f"at most {limits.max_messages} prompts are allowed", param="prompt"
        )
    if (body.logprobs or 0) > limits.max_top_logprobs:
        raise InvalidRequestError(
            f"`logprobs` must be at most {limits.max_top_logprobs}", param="logprobs"
        )
    if body.echo and body.logprobs is not None:
        # The prompt's own log-probabilities would need a scoring pass no engine runs here.
        raise InvalidRequestError(
            "`echo` with `logprobs` is not supported: Chorus does not score prompts",
            param="echo",
        )
    params = SamplingParams(
        max_tokens=body.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=body.temperature,
        top_p=body.top_p,
        n=body.n,
        stop=tuple(stop),
        seed=body.seed,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
    )
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generations = tuple(
        GenerationRequest(request_id, (), params, prompt=prompt) for prompt in prompts
    )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    quality_weight = body.quality_weight
    if quality_weight is None:  # the body's field wins over the header
        quality_weight = header_quality_weight(headers)
    max_cost = body.max_cost if body.max_cost is not None else header_max_cost(headers)
    if max_cost is not None and len(prompts) > 1:
        # Prompts are answered one after another: a budget cannot be kept for all of them
        # before the first is answered.
        raise InvalidRequestError(
            "`max_cost` applies to one prompt: send a list of prompts without it, or one "
            "request per prompt",
            param="max_cost",
        )
    chat = ChatRequest(
        body.model, generations[0], body.stream, include_usage, quality_weight, max_cost=max_cost
    )
    return CompletionRequest(chat, generations, body.echo, body.logprobs)
