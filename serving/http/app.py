"""The FastAPI application: the routes of `serving.http.routes`, the guard in front of them, and
OpenAI-shaped errors everywhere. Engines load in the background once the app starts."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from ensemble.engine import Engine
from serving.config import Config
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.runtime import Runtime
from serving.gateway.tracing import Tracing
from serving.http.error_handlers import install_error_handlers
from serving.http.guard import Guard
from serving.http.routes import chat, completions, health, models, playground
from serving.http.state import AppState


def create_app(
    config: Config,
    *,
    engines: Mapping[str, Engine] | None = None,
    config_path: Path | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """Build the app for `config`; until its engines are loaded `/health` answers 503.
    `engines` replaces the configured ones (tests, embedding). With `config_path`, SIGHUP
    reloads that file (`serving.gateway.runtime`). `tracing` replaces the one the config's
    `tracing` section sets up (tests: an in-memory exporter)."""
    runtime = Runtime(config, GatewayMetrics(), engines, config_path)
    tracing = tracing or Tracing.from_config(config.tracing)
    app = FastAPI(title="Chorus", version="0.1.0", lifespan=_lifespan(runtime, tracing))
    app.add_middleware(Guard, config=config.server)
    app.state.chorus = AppState.build(runtime, config.server, tracing)
    for routes in (chat, completions, models, health, playground):
        app.include_router(routes.router)
    install_error_handlers(app)
    return app


def _lifespan(
    runtime: Runtime, tracing: Tracing
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(runtime.gateway.start())
        reloads: set[asyncio.Task[bool]] = set()

        def on_sighup() -> None:
            task = asyncio.create_task(runtime.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop = asyncio.get_running_loop()
        if runtime.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            if runtime.config_path is not None:
                loop.remove_signal_handler(signal.SIGHUP)
            loading.cancel()
            for task in reloads:
                task.cancel()
            await runtime.aclose()
            tracing.shutdown()  # exports the spans still buffered

    return lifespan
