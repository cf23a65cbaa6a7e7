"""`POST /v1/chat/completions`: validate, admit, answer (JSON or SSE), and close the books.

Each request's slot, gauges, deadline, status and metrics belong to its `RequestScope`, closed
exactly once here (plain answers and errors) or by `ScopedStream` (streams, however they end).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.api.errors import GatewayError, ServiceUnavailableError
from serving.api.validation import ChatRequest, validate_chat
from serving.gateway.service import ChatCall, ChatService
from serving.http.request_scope import CLIENT_GONE, ClientGone, RequestScope
from serving.http.state import app_state

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    received = time.perf_counter()
    state = app_state(request)
    service = state.runtime.service  # the request stays on this gateway, even across a reload
    scope = RequestScope(
        service.gateway,
        slots=state.slots,
        timeout_s=state.server.request_timeout_s,
        received=received,
        spans=state.tracing.request(),
    )
    try:
        chat = validate_chat(await request.body(), state.server, request.headers)
        scope.label(chat.model)
        if state.runtime.draining:
            raise ServiceUnavailableError("Chorus is shutting down; retry on another replica.")
        if state.rate is not None:
            state.rate.check(_client_key(request))
        call = await scope.watch(request, _admitted_call(scope, service, chat))
        if chat.stream:
            events = service.stream(call, deadline_s=state.server.request_timeout_s)
            return ScopedStream(scope, events, headers=call.headers())
        result = await scope.watch(request, service.complete(call))
    except ClientGone:
        await scope.close(CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the work is stopped
    except GatewayError as exc:
        await scope.close(exc.status_code)
        raise
    except BaseException:
        await scope.close(500)
        raise
    await scope.close(200)
    return JSONResponse(result, headers=call.headers())


async def _admitted_call(scope: RequestScope, service: ChatService, chat: ChatRequest) -> ChatCall:
    """Wait for a slot, then route and start the answer (up to its first chunk)."""
    await scope.admit()
    scope.call = await service.start(chat, scope.received, scope.spans)
    return scope.call


class ScopedStream(StreamingResponse):
    """A streamed answer whose scope closes when the response ends, however it ends: read to
    [DONE], cut by the client, or never read at all."""

    def __init__(
        self, scope: RequestScope, events: AsyncGenerator[str, None], headers: dict[str, str]
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.scope = scope
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()  # a client that left may leave it suspended, or unstarted
            call = self.scope.call
            outcome = call.outcome if call is not None else None
            await self.scope.close(CLIENT_GONE if outcome is None else outcome)


def _client_key(request: Request) -> str:
    """Whom a rate limit counts: the API key (as a digest), else the client's address."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()
    return "addr:" + (request.client.host if request.client else "unknown")
