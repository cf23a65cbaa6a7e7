"""Prometheus metrics, all `chorus_*`, owned by one object per app (never the global registry)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ensemble.budget import Cut

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chorus_requests",
            "Chat requests finished, by pool (or expert) asked for, strategy and HTTP status.",
            ["pool", "strategy", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "chorus_request_duration_seconds",
            "Time from request arrival to the last byte of the response.",
            ["pool", "strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "chorus_time_to_first_token_seconds",
            "Time from request arrival to the first generated text.",
            ["pool", "strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "chorus_tokens",
            "Tokens processed per expert; kind is prompt or completion.",
            ["expert", "kind"],
            registry=r,
        )
        self.pool_tokens = Counter(
            "chorus_pool_tokens",
            "Tokens each expert spent on a pool's requests (prompt or completion): the tokens "
            "chorus_cost_total is reckoned from.",
            ["pool", "expert", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "chorus_cost",
            "What each expert's work on a pool's requests cost, in the pool's cost unit "
            "(/v1/models says which).",
            ["pool", "expert"],
            registry=r,
        )
        self.inflight = Gauge(
            "chorus_inflight_requests", "Chat requests being served now.", registry=r
        )
        self.expert_selected = Counter(
            "chorus_expert_selected",
            "Times an expert was chosen to work on a request, by pool.",
            ["pool", "expert"],
            registry=r,
        )
        self.routing_duration = Histogram(
            "chorus_routing_duration_seconds",
            "Time to choose a pool's experts for a request (embedding included).",
            ["pool"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.route_ood = Counter(
            "chorus_route_ood",
            "Requests whose query was far from every calibration cluster (global ranking used).",
            ["pool"],
            registry=r,
        )
        self.vote_agreement = Histogram(
            "chorus_vote_agreement_ratio",
            "Weighted share of the winning answer among a vote's samples.",
            ["pool"],
            buckets=(0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.vote_escalations = Counter(
            "chorus_vote_escalations",
            "Votes that sampled the next routed expert because the top one disagreed with itself.",
            ["pool"],
            registry=r,
        )
        self.fusion_steps = Counter(
            "chorus_fusion_steps",
            "Pieces of text chosen by token-level strategies (fuse, cascade).",
            ["pool"],
            registry=r,
        )
        self.fusion_gate_skips = Counter(
            "chorus_fusion_gate_skips",
            "Fusion steps the primary decided alone, sure enough to skip the others.",
            ["pool"],
            registry=r,
        )
        self.fusion_step_seconds = Histogram(
            "chorus_fusion_step_seconds",
            "Time per token-level step, every expert asked included.",
            ["pool"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.expert_failures = Counter(
            "chorus_expert_failures",
            "Experts that failed while working on a request.",
            ["expert"],
            registry=r,
        )
        self.fallbacks = Counter(
            "chorus_fallbacks",
            "Requests answered by another expert after the routed one failed.",
            ["pool"],
            registry=r,
        )
        self.budget_skips = Counter(
            "chorus_budget_skips",
            "Model calls a request's budget kept from starting or trimmed, by what was cut "
            "(answer, fallback, escalation, samples, fan-out) and the limit that cut it "
            "(max_cost, max_fan_out).",
            ["pool", "call", "limit"],
            registry=r,
        )
        self.expert_healthy = Gauge(
            "chorus_expert_healthy",
            "1 when the expert is loaded and serving, else 0.",
            ["expert"],
            registry=r,
        )
        self.config_reloads = Counter(
            "chorus_config_reloads",
            "Config reloads (SIGHUP), by result: ok, or refused (the old config kept serving).",
            ["result"],
            registry=r,
        )

    def count_cuts(self, pool: str, cuts: Iterable[Cut]) -> None:
        """What a request's budget cut, whether it was answered or refused."""
        for cut in cuts:
            self.budget_skips.labels(pool, cut.call, cut.limit).inc()
