"""`POST /v1/chat/completions`: a chat body through the shared flow (`serving.http.answering`)."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving.api.validation import validate_chat
from serving.config import ServerConfig
from serving.gateway.service import ChatCall, ChatService
from serving.gateway.tracing import RequestSpans
from serving.http.answering import Answer, answer

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    return await answer(request, _validate)


def _validate(raw: bytes, limits: ServerConfig, headers: Mapping[str, str]) -> Answer:
    chat = validate_chat(raw, limits, headers)

    def start(
        service: ChatService, received: float, spans: RequestSpans | None
    ) -> Awaitable[ChatCall]:
        return service.start(chat, received, spans)

    return Answer(chat.model, chat.stream, start)
