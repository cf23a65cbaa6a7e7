"""One chat request, from validated body to OpenAI response: route, run the strategy, shape output.

No FastAPI here: `ChatService` returns dicts and SSE strings, so it is testable without HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from ensemble.errors import EngineError
from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from router.decision import RouteDecision
from serving.api.errors import (
    DeadlineExceededError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    ServiceUnavailableError,
    http_error,
)
from serving.api.protocol import ChatCompletionRequest
from serving.gateway.pools import Gateway, Target

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ChatCall:
    """A request in flight: its identity, routing, timings, the stream it reads from, and how
    it ended (`outcome`, the status once the answer or an in-stream error was sent; None while
    it runs, and for good when the client left first)."""

    id: str
    created: int
    body: ChatCompletionRequest
    target: Target
    decision: RouteDecision
    routed: tuple[str, ...]  # the experts the strategy started with, best first
    trace: EnsembleTrace
    received: float  # time.perf_counter() at arrival
    route_ms: float
    overhead_ms: float
    first: GenerationChunk
    rest: AsyncGenerator[GenerationChunk, None]
    first_token_at: float | None = None
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per expert
    completion_tokens: int = 0
    outcome: int | None = None

    def age(self) -> float:
        """Seconds since the request arrived."""
        return time.perf_counter() - self.received

    @property
    def labels(self) -> tuple[str, str]:
        return self.target.model_id, self.target.strategy.name

    def headers(self) -> dict[str, str]:
        headers = {
            "x-chorus-pool": self.target.model_id,
            "x-chorus-strategy": self.target.strategy.name,
            "x-chorus-experts": ",".join(self.routed),
            "x-chorus-overhead-ms": f"{self.overhead_ms:.2f}",
            "x-request-id": self.id,
        }
        if self.decision.cluster is not None:
            headers["x-chorus-cluster"] = str(self.decision.cluster)
            headers["x-chorus-ood"] = "true" if self.decision.ood else "false"
        return headers

    def chorus(self) -> dict[str, Any]:
        return self.trace.summaries() | {
            "pool": self.target.model_id,
            "strategy": self.target.strategy.name,
            "experts": list(self.trace.experts),
            "cluster": self.decision.cluster,
            "ood": self.decision.ood,
            "weights": list(self.trace.weights),
            "timings": {
                "route_ms": round(self.route_ms, 3),
                "total_ms": round((time.perf_counter() - self.received) * 1000, 3),
            },
        }

    def usage(self) -> dict[str, int]:
        """Every expert's prompt and every generated token, the losing vote samples included."""
        prompt = sum(self.prompt_tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }


class ChatService:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.metrics = gateway.metrics

    async def start(self, body: ChatCompletionRequest, received: float) -> ChatCall:
        """Validate, route and start generating; raise `GatewayError` before any byte is sent."""
        if not self.gateway.ready:
            raise ServiceUnavailableError("Chorus is still loading its experts; retry shortly.")
        target = self.gateway.target(body.model)
        max_n = target.strategy.max_n
        if max_n is not None and body.n > max_n:
            raise InvalidRequestError(
                f"`{target.model_id}` is a `{target.strategy.name}` pool, which returns one "
                f"answer per request: `n` must be at most {max_n}",
                param="n",
            )
        if not self.gateway.can_serve(target):
            reason = self.gateway.load_errors.get(target.model_id, "no expert of it is available")
            raise ServiceUnavailableError(f"`{target.model_id}` cannot serve now: {reason}")
        request = self._generation_request(body)
        route_start = time.perf_counter()
        try:
            decision = await target.router.route(request.messages)
        except Exception as exc:  # an embedder failure is the gateway's, not the client's
            raise ServiceUnavailableError(f"routing `{target.model_id}` failed: {exc}") from exc
        route_ms = (time.perf_counter() - route_start) * 1000
        self.metrics.routing_duration.labels(target.model_id).observe(route_ms / 1000)
        if decision.ood:
            self.metrics.route_ood.labels(target.model_id).inc()
        experts = [self.gateway.engines[name] for name in decision.experts]
        if not any(e.ready for e in experts):
            raise ServiceUnavailableError(f"no routed expert of `{target.model_id}` is available")
        trace = EnsembleTrace()
        overhead_ms = (time.perf_counter() - received) * 1000
        ready = [e for e in experts if e.ready]
        stream = target.strategy.run(request, ready, trace)
        # Wait for real content before answering, so a failure up to here is a clean HTTP error.
        try:
            first = await anext(stream)
        except BaseException as exc:
            await stream.aclose()
            if isinstance(exc, EngineError):
                raise http_error(exc) from exc
            raise
        return ChatCall(
            id=request.request_id,
            created=int(time.time()),
            body=body,
            target=target,
            decision=decision,
            routed=tuple(e.name for e in ready),
            trace=trace,
            received=received,
            route_ms=route_ms,
            overhead_ms=overhead_ms,
            first=first,
            rest=stream,
        )

    def _generation_request(self, body: ChatCompletionRequest) -> GenerationRequest:
        limits = self.gateway.config.server
        stop = body.stop_list()
        if body.n > limits.max_n:
            raise InvalidRequestError(f"`n` must be at most {limits.max_n}", param="n")
        if len(stop) > limits.max_stop:
            raise InvalidRequestError(
                f"at most {limits.max_stop} stop sequences are allowed", param="stop"
            )
        if len(body.messages) > limits.max_messages:
            raise InvalidRequestError(
                f"at most {limits.max_messages} messages are allowed", param="messages"
            )
        if (body.top_logprobs or 0) > limits.max_top_logprobs:
            raise InvalidRequestError(
                f"`top_logprobs` must be at most {limits.max_top_logprobs}", param="top_logprobs"
            )
        params = SamplingParams(
            max_tokens=body.completion_limit(),
            temperature=body.temperature,
            top_p=body.top_p,
            n=body.n,
            stop=tuple(stop),
            seed=body.seed,
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs or 0,
        )
        messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
        return GenerationRequest(f"chatcmpl-{uuid.uuid4().hex}", messages, params)

    # -- reading the stream ------------------------------------------------------------------

    async def _chunks(
        self, call: ChatCall, deadline_s: float | None = None
    ) -> AsyncGenerator[GenerationChunk, None]:
        """The call's chunks; past `deadline_s` from arrival, a `DeadlineExceededError` (the
        strategy's work is closed with the stream, even while it waits on a stalled expert)."""
        loop = asyncio.get_running_loop()
        when = None if deadline_s is None else loop.time() + deadline_s - call.age()
        async with aclosing(call.rest):
            yield call.first
            while True:
                try:
                    async with asyncio.timeout_at(when):
                        chunk = await anext(call.rest)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"the request ran past its {deadline_s:g}s deadline"
                    ) from None
                except EngineError as exc:
                    raise http_error(exc) from exc
                yield chunk

    def _count(self, call: ChatCall, chunk: GenerationChunk) -> None:
        seen = call.prompt_tokens.get(chunk.expert, 0)
        call.prompt_tokens[chunk.expert] = max(seen, chunk.prompt_tokens)
        call.completion_tokens += chunk.tokens
        if chunk.tokens:  # remote experts count theirs once, at the end: text chunks carry 0
            self.metrics.tokens.labels(chunk.expert, "completion").inc(chunk.tokens)
        if call.first_token_at is None and chunk.text:
            call.first_token_at = time.perf_counter()
            self.metrics.time_to_first_token.labels(*call.labels).observe(
                call.first_token_at - call.received
            )

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        """Read the whole stream into one `chat.completion` object."""
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[dict[str, Any]]] = {}
        finish: dict[int, str] = {}
        async for chunk in self._chunks(call):
            if chunk.keepalive:
                continue
            self._count(call, chunk)
            texts.setdefault(chunk.index, []).append(chunk.text)
            logprobs.setdefault(chunk.index, []).extend(_logprob_json(chunk.logprobs))
            if chunk.finish_reason:
                finish[chunk.index] = chunk.finish_reason
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(texts.get(i, []))},
                "logprobs": {"content": logprobs.get(i, [])} if call.body.logprobs else None,
                "finish_reason": finish.get(i, "stop"),
            }
            for i in range(call.body.n)
        ]
        call.outcome = 200
        return {
            "id": call.id,
            "object": "chat.completion",
            "created": call.created,
            "model": call.target.model_id,
            "choices": choices,
            "usage": call.usage(),
            "chorus": call.chorus(),
        }

    async def stream(
        self, call: ChatCall, deadline_s: float | None = None
    ) -> AsyncGenerator[str, None]:
        """SSE events: a role chunk per choice, content chunks, optional usage, then [DONE].

        Once bytes are out the HTTP status stays 200: an error is sent as an error event before
        [DONE], and its status is the call's `outcome`."""
        try:
            for i in range(call.body.n):
                yield _sse(
                    self._chunk(call, i, {"role": "assistant", "content": ""}, with_meta=True)
                )
            # A choice's finishing chunk carries the `chorus` object, so it waits for the
            # strategy's end: token-level strategies complete their trace as they finish.
            finishing: list[GenerationChunk] = []
            async for chunk in self._chunks(call, deadline_s):
                if chunk.keepalive:
                    yield ": keep-alive\n\n"
                    continue
                self._count(call, chunk)
                if chunk.finish_reason is not None:
                    finishing.append(chunk)
                elif chunk.text:  # else accounting only: tokens of samples that lost a vote
                    yield _sse(self._delta(call, chunk))
            for chunk in finishing:
                yield _sse(self._delta(call, chunk))
            options = call.body.stream_options
            if options is not None and options.include_usage:
                yield _sse(self._envelope(call, [], usage=call.usage(), chorus=call.chorus()))
            call.outcome = 200
        except GatewayError as exc:
            call.outcome = exc.status_code
            yield _sse(exc.to_dict())
        except Exception as exc:  # a defect: the client still gets an error event and [DONE]
            logger.error("request %s failed mid-stream", call.id, exc_info=exc)
            error = InternalError("Internal server error.")
            call.outcome = error.status_code
            yield _sse(error.to_dict())
        yield "data: [DONE]\n\n"

    def _delta(self, call: ChatCall, chunk: GenerationChunk) -> dict[str, Any]:
        return self._chunk(
            call,
            chunk.index,
            {"content": chunk.text} if chunk.text else {},
            finish=chunk.finish_reason,
            logprobs=chunk.logprobs if call.body.logprobs else None,
            with_meta=chunk.finish_reason is not None,
        )

    def _chunk(
        self,
        call: ChatCall,
        index: int,
        delta: dict[str, Any],
        *,
        finish: str | None = None,
        logprobs: tuple[TokenLogprob, ...] | None = None,
        with_meta: bool = False,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": _logprob_json(logprobs)} if logprobs is not None else None,
            "finish_reason": finish,
        }
        return self._envelope(call, [choice], chorus=call.chorus() if with_meta else None)

    def _envelope(
        self,
        call: ChatCall,
        choices: list[dict[str, Any]],
        *,
        usage: dict[str, int] | None = None,
        chorus: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": call.id,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.target.model_id,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        if chorus is not None:
            out["chorus"] = chorus
        return out


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _logprob_json(items: tuple[TokenLogprob, ...] | None) -> list[dict[str, Any]]:
    return [
        {
            "token": item.token,
            "logprob": item.logprob,
            "bytes": list(item.token.encode("utf-8")),
            "top_logprobs": [
                {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8"))}
                for t in item.top
            ],
        }
        for item in items or ()
    ]
