"""Operations: `GET /health` (200 when ready, 503 loading or draining) and `GET /metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.http.state import app_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    runtime = app_state(request).runtime
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


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    runtime = app_state(request).runtime
    # Read at scrape: remote experts come and go.
    for name, engine in runtime.gateway.engines.items():
        runtime.metrics.expert_healthy.labels(name).set(1 if engine.ready else 0)
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
