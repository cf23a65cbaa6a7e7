"""`POST /v1/completions` (the legacy completions API): raw prompts, no chat template, through
the same flow as chat (`serving.http.answering`): keys, limits, admission, deadline, metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.api.completion_validation import validate_completion
from serving.config import ServerConfig
from serving.gateway.service import ChatCall, ChatService
from serving.gateway.tracing import RequestSpans
from serving.http.answering import Answer, answer

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Response:
    return await answer(request, _validate)


def _validate(raw: bytes, limits: ServerConfig, headers: Mapping[str, str]) -> Answer:
    completion = validate_completion(raw, limits, headers)

    def start(
        service: ChatService, received: float, spans: RequestSpans | None
    ) -> Awaitable[ChatCall]:
        return service.start(
            completion.chat, received, spans, shape=completion.shape(), prompts=completion.prompts
        )

    return Answer(completion.chat.model, completion.chat.stream, start)
