"""The FastAPI application: OpenAI routes, health, metrics, and OpenAI-shaped errors everywhere."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ensemble.engine import Engine
from serving.admission import ConcurrencyLimit, RateLimit
from serving.config import Config, key_path
from serving.errors import (
    DeadlineExceededError,
    GatewayError,
    ServiceUnavailableError,
    error_body,
)
from serving.guard import Guard
from serving.metrics import GatewayMetrics
from serving.protocol import ChatCompletionRequest, model_card
from serving.runtime import Runtime

logger = logging.getLogger(__name__)
T = TypeVar("T")


def create_app(
    config: Config,
    *,
    engines: Mapping[str, Engine] | None = None,
    config_path: Path | None = None,
) -> FastAPI:
    """Build the app for `config`. Engines load in the background once the app starts; until
    then `/health` answers 503. `engines` replaces the configured ones (tests, embedding). With
    `config_path`, SIGHUP reloads that file (`serving.runtime`)."""
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
        received = time.perf_counter()
        service = runtime.service  # the request stays on this gateway, even across a reload
        gateway = service.gateway
        pool = body.model if body.model in gateway.targets else "unknown"
        try:
            if runtime.draining:
                raise ServiceUnavailableError("Chorus is shutting down; retry on another replica.")
            if rate is not None:
                rate.check(_client_key(request))
            if slots is not None:
                await slots.acquire()
        except GatewayError as exc:
            metrics.requests.labels(pool, "", str(exc.status_code)).inc()
            raise
        metrics.inflight.inc()
        gateway.inflight += 1

        def finished() -> None:
            metrics.inflight.dec()
            gateway.inflight -= 1
            if slots is not None:
                slots.release()

        try:
            call = await service.start(body, received)
        except BaseException as exc:
            if isinstance(exc, GatewayError):
                metrics.requests.labels(pool, "", str(exc.status_code)).inc()
            finished()
            raise
        deadline = server.request_timeout_s
        if not body.stream:
            try:
                result = await _unless_abandoned(request, service.complete(call), deadline)
            except _ClientGone:
                metrics.requests.labels(*call.labels, "499").inc()
                return Response(status_code=499)  # nobody reads it; the work is already stopped
            finally:
                finished()
            return JSONResponse(result, headers=call.headers())

        async def events() -> AsyncIterator[str]:
            # A client that disconnects cancels this generator, which closes the strategy and
            # engine streams under it: their work stops with it.
            try:
                async for event in service.stream(call, deadline_s=deadline):
                    yield event
            finally:
                finished()

        return StreamingResponse(events(), media_type="text/event-stream", headers=call.headers())

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


class _ClientGone(Exception):
    pass


async def _unless_abandoned(
    request: Request, work: Coroutine[Any, Any, T], deadline_s: float | None
) -> T:
    """Run `work`, cancelling it (and the engine work under it) if the client disconnects, or
    past the deadline."""
    task = asyncio.create_task(work)
    started = time.perf_counter()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone
            if deadline_s is not None and time.perf_counter() - started > deadline_s:
                raise DeadlineExceededError(f"the request ran past its {deadline_s:g}s deadline")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


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
