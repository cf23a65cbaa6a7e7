"""A request's budget (`ensemble.budget`) as the gateway builds it: the client's `max_cost`,
priced with the cost models the accounting uses, and the pool's `max_fan_out`.

A target with an expert that has no cost (no price, no calibration measured it), or whose
experts are costed in different units, cannot honour `max_cost`: a 400 naming it, never a
limit silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from ensemble.budget import Budget, Quote
from ensemble.engine import Engine
from ensemble.errors import RequestRejected
from ensemble.types import GenerationRequest
from router.costs import CostModel, one_unit
from serving.api.errors import InvalidRequestError
from serving.gateway.pools import Gateway, Target


class ExpertPricer:
    """Quotes a call to an expert: its prompt counted by its own engine, priced by its cost
    model; its completion tokens, when the request sets none, what its engine would allow."""

    def __init__(
        self, unit: str, costs: Mapping[str, CostModel], defaults: Mapping[str, int | None]
    ) -> None:
        self.unit = unit
        self.costs = costs
        self.defaults = defaults  # each expert's configured `defaults.max_tokens`

    async def quote(self, expert: Engine, request: GenerationRequest) -> Quote:
        count = getattr(expert, "count_prompt_tokens", None)
        tokens = None if count is None else await count(request)
        if tokens is None:
            raise RequestRejected(
                f"expert `{expert.name}` cannot count a prompt's tokens before answering (its "
                "server has no `/tokenize`), so `max_cost` cannot be honoured",
                param="max_cost",
            )
        model = self.costs[expert.name]
        room = max(expert.context_window - tokens, 0)
        # The engines' own default: the configured max_tokens, within the context window.
        ceiling = min(self.defaults.get(expert.name) or room, room)
        return Quote(tokens, tokens * model.per_prompt_token, model.per_completion_token, ceiling)


def request_budget(gateway: Gateway, target: Target, max_cost: float | None) -> Budget | None:
    """The budget of a request to `target`; None when neither limit applies."""
    if max_cost is None and target.max_fan_out is None:
        return None
    pricer = None if max_cost is None else _pricer(gateway, target)
    return Budget(max_cost=max_cost, max_fan_out=target.max_fan_out, pricer=pricer)


def _pricer(gateway: Gateway, target: Target) -> ExpertPricer:
    kind = "pool" if target.kind == "pool" else "expert"
    unpriced = [e for e in target.experts if e not in gateway.costs]
    if unpriced:
        raise InvalidRequestError(
            f"the {kind} `{target.model_id}` cannot honour `max_cost`: "
            f"{', '.join(f'`{e}`' for e in unpriced)} "
            f"{'has' if len(unpriced) == 1 else 'have'} no price and no cost measured by "
            "calibration (give each expert a `price`)",
            param="max_cost",
        )
    costs = {e: gateway.costs[e] for e in target.experts}
    try:
        unit = one_unit(costs, f"the {kind} `{target.model_id}`")
    except ValueError as exc:  # a max_cost in which unit?
        raise InvalidRequestError(
            f"{exc}; it cannot honour `max_cost` meanwhile", param="max_cost"
        ) from None
    defaults = {e: gateway.config.experts[e].defaults.max_tokens for e in target.experts}
    return ExpertPricer(unit, costs, defaults)
