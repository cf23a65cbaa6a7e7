"""The FastAPI application: OpenAI routes, health, metrics, and OpenAI-shaped errors everywhere."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ensemble.engine import Engine
from serving.api.errors import GatewayError, ServiceUnavailableError, error_body
from serving.api.protocol import ChatCompletionRequest, model_card
from serving.config import Config, key_path
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.runtime import Runtime
from serving.gateway.service import ChatCall, ChatService
from serving.http.admission import ConcurrencyLimit, RateLimit
from serving.http.guard import Guard
from serving.http.request_scope import CLIENT_GONE, ClientGone, RequestScope

logger = logging.getLogger(__name__)


def create_app(
    config: Config,
    *,
    engines: Mapping[str, Engine] | None = None,
    config_path: Path | None = None,
) -> FastAPI:
    """Build the app for `config`. Engines load in the background once the app starts; until
    then `/health` answers 503. `engines` replaces the configured ones (tests, embedding). With
    `config_path`, SIGHUP reloads that file (`serving.gateway.runtime`)."""
    metrics = GatewayMetrics()
    runtime = Runtime(config, metrics, engines, config_path)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(runtime.gateway.start())
        reloads: set[asyncio.Task[bool]] = set()

        def on_sighup() -> None:
            task = asyncio.create_task(runtime.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        if config_path is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            if config_path is not None:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            loading.cancel()
            for task in reloads:
                task.cancel()
            await runtime.aclose()

    app = FastAPI(title="Chorus", version="0.1.0", lifespan=lifespan)
    app.add_middleware(Guard, config=config.server)
    app.state.runtime = runtime
    _install_error_handlers(app, metrics)

    server = config.server
    rate = RateLimit(server.rate_limit_per_minute) if server.rate_limit_per_minute else None
    slots = (
        ConcurrencyLimit(server.max_concurrent_requests, server.max_queue, server.queue_timeout_s)
        if server.max_concurrent_requests
        else None
    )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        service = runtime.service  # the request stays on this gateway, even across a reload
        scope = RequestScope(
            service.gateway,
            body.model,
            slots=slots,
            timeout_s=server.request_timeout_s,
            received=time.perf_counter(),
        )
        try:
            if runtime.draining:
                raise ServiceUnavailableError("Chorus is shutting down; retry on another replica.")
            if rate is not None:
                rate.check(_client_key(request))
            call = await scope.watch(request, _admitted_call(scope, service, body))
            if body.stream:
                events = service.stream(call, deadline_s=server.request_timeout_s)
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

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        gateway = runtime.gateway
        config = gateway.config
        cards = []
        for name, expert in config.experts.items():
            engine = gateway.engines[name]
            extra = {"max_model_len": engine.context_window} if engine.ready else {}
            cards.append(
                model_card(
                    name, "chorus", created, root=expert.model, chorus={"type": "expert"}, **extra
                )
            )
        for name, pool in config.pools.items():
            meta = {"type": "pool", "experts": list(pool.experts), "strategy": pool.strategy.type}
            cards.append(model_card(name, "chorus", created, chorus=meta))
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health() -> JSONResponse:
        gateway = runtime.gateway
        body: dict[str, Any] = {
            "experts": {name: engine.ready for name, engine in gateway.engines.items()}
        }
        if gateway.load_errors:
            body["errors"] = gateway.load_errors
        if gateway.ready and not runtime.draining:
            return JSONResponse({"status": "ok", **body})
        status = "draining" if runtime.draining else "loading" if gateway.loading else "unavailable"
        return JSONResponse({"status": status, **body}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        # Read at scrape: remote experts come and go.
        for name, engine in runtime.gateway.engines.items():
            metrics.expert_healthy.labels(name).set(1 if engine.ready else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _admitted_call(
    scope: RequestScope, service: ChatService, body: ChatCompletionRequest
) -> ChatCall:
    """Wait for a slot, then route and start the answer (up to its first chunk)."""
    await scope.admit()
    scope.call = await service.start(body, scope.received)
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


def _error(
    status: int, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status)


def _install_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 shape never leaks: OpenAI clients expect 400 with `error.message`.
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [p for p in first.get("loc", ()) if p != "body"]
        param = key_path(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        elif param:
            message = f"{param}: {message}"
        metrics.requests.labels("unknown", "", "400").inc()
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = _error(exc.status_code, str(exc.detail), error_type)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return _error(500, "Internal server error.", "internal_error")
