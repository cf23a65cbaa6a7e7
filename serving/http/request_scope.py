"""One chat request's books, kept in one place.

A `RequestScope` owns everything a request takes and everything said about it: its admission
slot, the in-flight gauges, the deadline and disconnect watch before the response starts, its
final status, and every metric of it. `close` stops what is still running and gives everything
back exactly once, whatever happened: an answer, an error, a client that left, a deadline, or a
response body the server never started reading.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from serving.api.errors import DeadlineExceededError
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.pools import Gateway
from serving.gateway.service import ChatCall
from serving.gateway.tracing import RequestSpans
from serving.http.admission import ConcurrencyLimit

T = TypeVar("T")

CLIENT_GONE = 499  # nginx's "client closed request": the client left before the answer ended
_POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected before its response started."""


class RequestScope:
    def __init__(
        self,
        gateway: Gateway,
        *,
        slots: ConcurrencyLimit | None,
        timeout_s: float | None,
        received: float,
        spans: RequestSpans | None = None,
    ) -> None:
        self.gateway = gateway
        self.spans = spans  # None unless the request is traced
        self.metrics: GatewayMetrics = gateway.metrics
        self.pool = "unknown"  # until the body names a model this gateway serves
        self.slots = slots
        self.timeout_s = timeout_s
        self.received = received  # time.perf_counter() at arrival
        self.call: ChatCall | None = None
        self._admitted = False
        self._closed = False

    def label(self, model: str) -> None:
        """Count the request under the pool (or expert) it asks for, if it exists."""
        if model in self.gateway.targets:
            self.pool = model
            if self.spans is not None:
                self.spans.label(model)

    async def admit(self) -> None:
        """Take a slot (waiting in the queue if need be) and count the request as in flight."""
        if self.slots is not None:
            await self.slots.acquire()
        self._admitted = True
        self.metrics.inflight.inc()
        self.gateway.inflight += 1

    async def watch(self, request: Request, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` (queueing, routing, the wait for the first chunk, a whole plain answer);
        cancel it, and the engine work under it, when the client disconnects (`ClientGone`) or
        the request's deadline from arrival passes (`DeadlineExceededError`)."""
        task = asyncio.create_task(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._wait_s())
                if done:
                    return task.result()
                if self.timeout_s is not None and self.age() >= self.timeout_s:
                    raise DeadlineExceededError(
                        f"the request ran past its {self.timeout_s:g}s deadline"
                    )
                if await request.is_disconnected():
                    raise ClientGone
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _wait_s(self) -> float:
        if self.timeout_s is None:
            return _POLL_S
        return max(0.0, min(_POLL_S, self.timeout_s - self.age()))

    def age(self) -> float:
        return time.perf_counter() - self.received

    async def close(self, status: int) -> None:
        """Stop the strategy's work if it still runs, then record `status` and the request's
        metrics and give back its slot. Only the first call counts."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.call is not None:
                # Token-level strategies complete their trace as they close.
                await self.call.rest.aclose()
        finally:
            self._record(status)
            if self.spans is not None:
                self.spans.finish(status, self.call)
            if self._admitted:
                self.metrics.inflight.dec()
                self.gateway.inflight -= 1
                if self.slots is not None:
                    self.slots.release()

    def _record(self, status: int) -> None:
        m, call = self.metrics, self.call
        labels = call.labels if call is not None else (self.pool, "")
        m.requests.labels(*labels, str(status)).inc()
        m.request_duration.labels(*labels).observe(self.age())
        if call is None:
            return
        pool = call.target.model_id
        for expert, tokens in call.prompt_tokens.items():
            m.tokens.labels(expert, "prompt").inc(tokens)
        for expert, usage in call.expert_usage().items():
            m.pool_tokens.labels(pool, expert, "prompt").inc(usage["prompt_tokens"])
            m.pool_tokens.labels(pool, expert, "completion").inc(usage["completion_tokens"])
            if usage["cost"] is not None:
                m.cost.labels(pool, expert).inc(usage["cost"])
        for expert in call.trace.experts:
            m.expert_selected.labels(pool, expert).inc()
        for expert in call.trace.failed:
            m.expert_failures.labels(expert).inc()
        if call.trace.failed and status == 200:
            m.fallbacks.labels(pool).inc()
        if call.budget is not None:
            m.count_cuts(pool, call.budget.skipped)
        if (vote := call.trace.vote) is not None:
            m.vote_agreement.labels(pool).observe(vote.agreement)
            if vote.escalated:
                m.vote_escalations.labels(pool).inc()
