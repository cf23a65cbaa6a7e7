"""What the routes read from the app: the runtime (swapped on reload), metrics, admission,
tracing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request

from serving.config import ServerConfig
from serving.gateway.runtime import Runtime
from serving.gateway.tracing import Tracing
from serving.http.admission import ConcurrencyLimit, RateLimit


@dataclass(slots=True)
class AppState:
    runtime: Runtime
    server: ServerConfig
    rate: RateLimit | None
    slots: ConcurrencyLimit | None
    tracing: Tracing
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, runtime: Runtime, server: ServerConfig, tracing: Tracing) -> AppState:
        rate = RateLimit(server.rate_limit_per_minute) if server.rate_limit_per_minute else None
        slots = None
        if server.max_concurrent_requests:
            slots = ConcurrencyLimit(
                server.max_concurrent_requests, server.max_queue, server.queue_timeout_s
            )
        return cls(runtime, server, rate, slots, tracing)


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.chorus
    return state
