"""`GET /v1/models`: every expert and every pool, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from router.costs import CostModel
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
        meta: dict[str, Any] = {
            "type": "expert",
            "cost": _cost(gateway.costs.get(name), expert.price is None),
        }
        cards.append(
            model_card(name, "chorus", state.created, root=expert.model, chorus=meta, **extra)
        )
    for name, pool in config.pools.items():
        target = gateway.targets[name]
        meta = {
            "type": "pool",
            "experts": list(pool.experts),
            "strategy": pool.strategy.type,
            "quality_weight": pool.quality_weight,
            "cost_aware": target.cost_aware,
            "cost_scale": pool.router.cost_scale if pool.router else None,
            "max_fan_out": pool.max_fan_out,
        }
        cards.append(model_card(name, "chorus", state.created, chorus=meta))
    return {"object": "list", "data": cards}


def _cost(model: CostModel | None, measured: bool) -> dict[str, Any] | None:
    """How an expert's requests are costed: per million tokens, and whether that is its price
    or the seconds its calibration measured on the machine it ran on."""
    if model is None:
        return None
    return {
        "unit": model.unit,
        "per_million_prompt_tokens": model.per_prompt_token * 1e6,
        "per_million_completion_tokens": model.per_completion_token * 1e6,
        "source": "measured by calibration" if measured else "price",
    }
