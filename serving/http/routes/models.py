"""`GET /v1/models`: every expert and every pool, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serving.api.protocol import model_card
from serving.http.state import app_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = app_state(request)
    gateway = state.runtime.gateway
    config = gateway.config
    cards = []
    for name, expert in config.experts.items():
        engine = gateway.engines[name]
        extra = {"max_model_len": engine.context_window} if engine.ready else {}
        cards.append(
            model_card(
                name, "chorus", state.created, root=expert.model, chorus={"type": "expert"}, **extra
            )
        )
    for name, pool in config.pools.items():
        meta = {"type": "pool", "experts": list(pool.experts), "strategy": pool.strategy.type}
        cards.append(model_card(name, "chorus", state.created, chorus=meta))
    return {"object": "list", "data": cards}
