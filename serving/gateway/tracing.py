"""OpenTelemetry traces of chat requests: one span per request, with child spans for routing, the
strategy, and each expert call or decode session under it (`serving.gateway.traced_engines`).

Off unless the config has a `tracing` section. Then `Tracing.request` returns None and the hot
path does one `is None` check per stage; the OpenTelemetry SDK and exporter are imported only
when tracing is on. Spans are parented explicitly, never through the ambient context: a request
runs in several tasks (the wait for its first chunk, the stream), and its strategy's generators
are resumed from each of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from ensemble.engine import Engine
from ensemble.types import EnsembleTrace
from router.decision import RouteDecision
from serving.config import TracingConfig
from serving.gateway.traced_engines import traced

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

logger = logging.getLogger(__name__)


class TracedCall(Protocol):
    """What a finished request's spans read off its `ChatCall` (a protocol: the service imports
    this module, not the other way round)."""

    trace: EnsembleTrace
    decision: RouteDecision

    @property
    def id(self) -> str: ...

    @property
    def labels(self) -> tuple[str, str]: ...

    def usage(self) -> dict[str, int]: ...

    def cost(self) -> float | None: ...


class Tracing:
    """The app's tracer, or None when tracing is off. Like the metrics, one per app, never the
    process-wide global provider."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer("chorus") if provider else None

    @classmethod
    def from_config(cls, config: TracingConfig | None) -> Tracing:
        if config is None:
            return cls()
        # Imported here: a server without tracing never loads the SDK.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        # Batched, exported from the SDK's own thread: a request never waits on the collector.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(config.otlp_endpoint)))
        logger.info("tracing on: OTLP/HTTP to %s", config.otlp_endpoint)
        return cls(provider)

    def request(self) -> RequestSpans | None:
        """A new request's spans; None when tracing is off or the request is not sampled."""
        if self.tracer is None:
            return None
        root = self.tracer.start_span("chorus.request", kind=SpanKind.SERVER)
        if not root.is_recording():
            return None
        return RequestSpans(self.tracer, root)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop."""
        if self.provider is not None:
            self.provider.shutdown()


class RequestSpans:
    """One request's spans: `chorus.request`, and under it `chorus.route` and `chorus.strategy`,
    under which each expert's calls are spans of their own."""

    def __init__(self, tracer: Tracer, root: Span) -> None:
        self.tracer = tracer
        self.root = root
        self.strategy: Span | None = None
        self._ended = False

    def _child(self, name: str, parent: Span) -> Span:
        return self.tracer.start_span(name, context=trace.set_span_in_context(parent))

    def label(self, pool: str) -> None:
        self.root.set_attribute("chorus.pool", pool)

    def route_started(self, pool: str) -> Span:
        span = self._child("chorus.route", self.root)
        span.set_attribute("chorus.pool", pool)
        return span

    @staticmethod
    def route_ended(
        span: Span, decision: RouteDecision | None, error: BaseException | None
    ) -> None:
        if decision is not None:
            span.set_attributes(
                {
                    "chorus.experts": list(decision.experts),
                    "chorus.ood": decision.ood,
                    **({} if decision.cluster is None else {"chorus.cluster": decision.cluster}),
                }
            )
        if error is not None:
            _failed(span, error)
        span.end()

    def strategy_started(self, strategy: str, experts: Sequence[Engine]) -> list[Engine]:
        """Open the strategy's span; the experts, wrapped so that their calls are its children."""
        self.strategy = self._child("chorus.strategy", self.root)
        self.strategy.set_attributes(
            {"chorus.strategy": strategy, "chorus.routed_experts": [e.name for e in experts]}
        )
        parent = trace.set_span_in_context(self.strategy)
        return [traced(e, self.tracer, parent) for e in experts]

    def finish(self, status: int, call: TracedCall | None) -> None:
        """End the strategy's span (with what the strategy did) and the request's (with its
        status, pool, experts and tokens). Only the first call counts."""
        if self._ended:
            return
        self._ended = True
        root = self.root
        if call is not None:
            root.set_attributes(_call_attributes(call))
        root.set_attribute("http.response.status_code", status)
        if self.strategy is not None:
            if call is not None:
                self.strategy.set_attributes(_trace_attributes(call.trace))
            self.strategy.end()
        if status >= 500:
            root.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        root.end()


def _failed(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def _call_attributes(call: TracedCall) -> dict[str, Any]:
    usage = call.usage()
    pool, strategy = call.labels
    attributes: dict[str, Any] = {
        "chorus.request_id": call.id,
        "chorus.pool": pool,
        "chorus.strategy": strategy,
        "chorus.experts": list(call.trace.experts),
        "chorus.ood": call.decision.ood,
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
    }
    if call.decision.cluster is not None:
        attributes["chorus.cluster"] = call.decision.cluster
    if (cost := call.cost()) is not None:
        attributes["chorus.cost"] = cost
    return attributes


def _trace_attributes(t: EnsembleTrace) -> dict[str, Any]:
    """What the strategy did, from its `EnsembleTrace`."""
    attributes: dict[str, Any] = {
        "chorus.experts": list(t.experts),
        "chorus.weights": list(t.weights),
        "chorus.failed": list(t.failed),
    }
    if t.vote is not None:
        attributes["chorus.vote.agreement"] = t.vote.agreement
        attributes["chorus.vote.escalated"] = t.vote.escalated
    if t.fusion is not None:
        attributes["chorus.fusion.steps"] = t.fusion.steps
        attributes["chorus.fusion.gate_skip_rate"] = t.fusion.gate_skip_rate
    if t.cascade is not None:
        attributes["chorus.cascade.steps"] = t.cascade.steps
        attributes["chorus.cascade.draft"] = t.cascade.draft
    return attributes
