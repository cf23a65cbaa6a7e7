"""What every generating route shares, from the body to the closed books: validate, admit,
answer (JSON or SSE), close. A route only says how its body becomes an `Answer`.

Each request's slot, gauges, deadline, status and metrics belong to its `RequestScope`, closed
exactly once here (plain answers and errors) or by `ScopedStream` (streams, however they end).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.api.errors import GatewayError, ServiceUnavailableError
from serving.config import ServerConfig
from serving.gateway.service import ChatCall, ChatService
from serving.gateway.tracing import RequestSpans
from serving.http.request_scope import CLIENT_GONE, ClientGone, RequestScope
from serving.http.state import app_state


@dataclass(frozen=True, slots=True)
class Answer:
    """A validated request, as the shared flow needs it: the model it names, whether it
    streams, and how to start it on a service (routing and the wait for the first chunk), its
    spans where the request is traced."""

    model: str
    stream: bool
    start: Callable[[ChatService, float, RequestSpans | None], Awaitable[ChatCall]]


Validate = Callable[[bytes, ServerConfig, Mapping[str, str]], Answer]


async def answer(request: Request, validate: Validate) -> Response:
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
        planned = validate(await request.body(), state.server, request.headers)
        scope.label(planned.model)
        if state.runtime.draining:
            raise ServiceUnavailableError("Chorus is shutting down; retry on another replica.")
        if state.rate is not None:
            state.rate.check(_client_key(request))
        call = await scope.watch(request, _admitted_call(scope, service, planned))
        if planned.stream:
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


async def _admitted_call(scope: RequestScope, service: ChatService, planned: Answer) -> ChatCall:
    """Wait for a slot, then route and start the answer (up to its first chunk)."""
    await scope.admit()
    scope.call = await planned.start(service, scope.received, scope.spans)
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
