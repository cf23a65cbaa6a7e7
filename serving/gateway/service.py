"""One chat request (or legacy completions request: raw prompts) through a gateway: route it,
run its pool's strategy, read the stream into an OpenAI response shaped by the endpoint's
`ResponseShape` (`serving.api.responses`), and account for its tokens.

No FastAPI here: `ChatService` takes a validated `ChatRequest` and returns dicts and SSE strings,
so it is testable without HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from ensemble.budget import Budget
from ensemble.errors import EngineError
from ensemble.prompt_list import each_prompt
from ensemble.toolcalls import (
    CallStream,
    ToolCallReader,
    allowed_calls,
    allowed_deltas,
    tool_reader,
)
from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    Piece,
    TokenLogprob,
    ToolCall,
)
from router.costs import CostModel
from router.decision import RouteDecision
from serving.api.errors import (
    DeadlineExceededError,
    GatewayError,
    InternalError,
    InvalidRequestError,
    ServiceUnavailableError,
    http_error,
)
from serving.api.responses import (
    SSE_DONE,
    SSE_KEEPALIVE,
    ChatShape,
    Envelope,
    ResponseShape,
    delta_choice,
    sse,
    tool_call_deltas,
)
from serving.api.validation import ChatRequest
from serving.gateway.budgets import request_budget
from serving.gateway.capabilities import able, check_strategy
from serving.gateway.pools import Gateway, Target
from serving.gateway.tracing import RequestSpans

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ChatCall:
    """A request in flight: its identity, routing, timings, the stream it reads from, and how
    it ended (`outcome`, the status once the answer or an in-stream error was sent; None while
    it runs, and for good when the client left first)."""

    chat: ChatRequest
    envelope: Envelope
    shape: ResponseShape  # the endpoint's choices: chat messages, or text completions
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
    costs: Mapping[str, CostModel] = field(default_factory=dict)  # per expert, where known
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per expert
    # Per expert and prompt (a list of raw prompts has several): the prompt tokens counted.
    prompt_seen: dict[tuple[str, int], int] = field(default_factory=dict)
    completion_tokens: Counter[str] = field(default_factory=Counter)  # per expert
    budget: Budget | None = None  # the request's `max_cost` and the pool's `max_fan_out`
    outcome: int | None = None

    @property
    def id(self) -> str:
        return self.chat.id

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
        cost = self.cost()
        if self.outcome is not None and cost is not None:  # a stream's is in its last chunk
            headers["x-chorus-cost"] = f"{cost:.6g}"
        if self.decision.cluster is not None:
            headers["x-chorus-cluster"] = str(self.decision.cluster)
            headers["x-chorus-ood"] = "true" if self.decision.ood else "false"
        return headers

    def expert_usage(self) -> dict[str, dict[str, Any]]:
        """Per expert: the prompt and completion tokens this request spent on it, and their
        cost (None where the expert has no price and no measured cost)."""
        out: dict[str, dict[str, Any]] = {}
        for expert in {**self.prompt_tokens, **self.completion_tokens}:
            prompt, completion = self.prompt_tokens.get(expert, 0), self.completion_tokens[expert]
            model = self.costs.get(expert)
            out[expert] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost": None if model is None else model.cost(prompt, completion),
            }
        return out

    def cost(self) -> float | None:
        """What the request cost, every expert it used included; None when one has no cost."""
        costs = [u["cost"] for u in self.expert_usage().values()]
        return None if any(c is None for c in costs) else float(sum(costs))

    def chorus(self) -> dict[str, Any]:
        units = {m.unit for e, m in self.costs.items() if e in self.target.experts}
        budget = {} if self.budget is None else {"budget": self.budget.as_json(self.cost())}
        return (
            self.trace.summaries()
            | budget
            | {
                "pool": self.target.model_id,
                "strategy": self.target.strategy.name,
                "experts": list(self.trace.experts),
                "cluster": self.decision.cluster,
                "ood": self.decision.ood,
                "weights": list(self.trace.weights),
                "cost": self.cost(),
                "cost_unit": units.pop() if len(units) == 1 else None,
                "usage": self.expert_usage(),
                "timings": {
                    "route_ms": round(self.route_ms, 3),
                    "total_ms": round((time.perf_counter() - self.received) * 1000, 3),
                },
            }
        )

    def usage(self) -> dict[str, int]:
        """Every expert's prompt and every generated token, the losing vote samples included."""
        prompt, completion = sum(self.prompt_tokens.values()), self.completion_tokens.total()
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


class ChatService:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.metrics = gateway.metrics

    async def start(
        self,
        chat: ChatRequest,
        received: float,
        spans: RequestSpans | None = None,
        *,
        shape: ResponseShape | None = None,
        prompts: tuple[GenerationRequest, ...] = (),
    ) -> ChatCall:
        """Route and start generating; raise `GatewayError` before any byte is sent.

        `prompts` are raw prompts (the legacy completions API), answered in turn, `n` choices
        each; `chat.generation` is the first of them. `shape` is the endpoint's (chat's when
        None). With `spans` (a traced request), routing and the strategy are spans of their
        own."""
        target = self._target(chat)
        if prompts:
            _check_raw_prompts(target)
        budget = request_budget(self.gateway, target, chat.max_cost)
        route_start = time.perf_counter()
        messages = _routed_messages(chat, prompts)
        if spans is None:
            decision = await self._route(target, chat, messages)
        else:
            decision = await self._traced_route(target, chat, messages, spans)
        route_ms = (time.perf_counter() - route_start) * 1000
        ready = [e for e in (self.gateway.engines[name] for name in decision.experts) if e.ready]
        if not ready:
            raise ServiceUnavailableError(f"no routed expert of `{target.model_id}` is available")
        others = [e for e in (self.gateway.engines[n] for n in target.experts) if e.ready]
        ready = able(target.model_id, ready, others, chat.generation)
        trace = EnsembleTrace()
        overhead_ms = (time.perf_counter() - received) * 1000
        experts = ready if spans is None else spans.strategy_started(target.strategy.name, ready)
        if prompts:
            stream = each_prompt(target.strategy, prompts, experts, trace, budget)
        else:
            stream = target.strategy.run(chat.generation, experts, trace, budget)
        shaped: ResponseShape = (
            shape if shape is not None else ChatShape(chat.n, chat.logprobs, chat.pieces)
        )
        # Wait for real content before answering, so a failure up to here is a clean HTTP error.
        try:
            first = await anext(stream)
        except BaseException as exc:
            await stream.aclose()
            if budget is not None:  # no call to record them: a refusal's cuts are counted here
                self.metrics.count_cuts(target.model_id, budget.skipped)
            if isinstance(exc, EngineError):
                raise http_error(exc) from exc
            raise
        return ChatCall(
            chat=chat,
            envelope=Envelope(
                chat.id, int(time.time()), target.model_id, shaped.object, shaped.chunk_object
            ),
            shape=shaped,
            target=target,
            decision=decision,
            routed=tuple(e.name for e in ready),
            trace=trace,
            received=received,
            route_ms=route_ms,
            overhead_ms=overhead_ms,
            first=first,
            rest=stream,
            costs=self.gateway.costs,
            budget=budget,
        )

    def _target(self, chat: ChatRequest) -> Target:
        """The pool (or expert) asked for, if it can take this request now."""
        if not self.gateway.ready:
            raise ServiceUnavailableError("Chorus is still loading its experts; retry shortly.")
        target = self.gateway.target(chat.model)
        if chat.generation.answer_format is not None and target.strategy.name != "vote":
            raise InvalidRequestError(
                f"`{target.model_id}` is a `{target.strategy.name}` "
                f"{'pool' if target.kind == 'pool' else 'expert'}: only vote pools read answers "
                "out of replies, so it cannot honour `answer_format`",
                param="answer_format",
            )
        check_strategy(target.model_id, target.strategy, chat.generation)
        max_n = target.strategy.max_n
        if max_n is not None and chat.n > max_n:
            raise InvalidRequestError(
                f"`{target.model_id}` is a `{target.strategy.name}` pool, which returns one "
                f"answer per request: `n` must be at most {max_n}",
                param="n",
            )
        if not self.gateway.can_serve(target):
            reason = self.gateway.load_errors.get(target.model_id, "no expert of it is available")
            raise ServiceUnavailableError(f"`{target.model_id}` cannot serve now: {reason}")
        return target

    async def _traced_route(
        self,
        target: Target,
        chat: ChatRequest,
        messages: tuple[ChatMessage, ...],
        spans: RequestSpans,
    ) -> RouteDecision:
        span = spans.route_started(target.model_id)
        try:
            decision = await self._route(target, chat, messages)
        except Exception as exc:
            spans.route_ended(span, None, exc)
            raise
        spans.route_ended(span, decision, None)
        return decision

    async def _route(
        self, target: Target, chat: ChatRequest, messages: tuple[ChatMessage, ...]
    ) -> RouteDecision:
        started = time.perf_counter()
        quality_weight = target.quality_weight
        if chat.quality_weight is not None:
            if not target.cost_aware:
                raise InvalidRequestError(
                    f"`{target.model_id}` has no router that knows costs, so it cannot honour "
                    "`quality_weight`",
                    param="quality_weight",
                )
            quality_weight = chat.quality_weight
        try:
            decision = await target.router.route(messages, quality_weight)
        except Exception as exc:  # an embedder failure is the gateway's, not the client's
            raise ServiceUnavailableError(f"routing `{target.model_id}` failed: {exc}") from exc
        self.metrics.routing_duration.labels(target.model_id).observe(time.perf_counter() - started)
        if decision.ood:
            self.metrics.route_ood.labels(target.model_id).inc()
        return decision

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
        # Every chunk of one generation repeats its prompt's tokens: count each prompt once
        # per expert (a vote's samples share one; a list's prompts add up).
        key = (chunk.expert, chunk.index // call.chat.n)
        seen = call.prompt_seen.get(key, 0)
        total = call.prompt_tokens.get(chunk.expert, 0)
        call.prompt_tokens[chunk.expert] = total + max(0, chunk.prompt_tokens - seen)
        call.prompt_seen[key] = max(seen, chunk.prompt_tokens)
        call.completion_tokens[chunk.expert] += chunk.tokens
        if chunk.tokens:  # remote experts count theirs once, at the end: text chunks carry 0
            self.metrics.tokens.labels(chunk.expert, "completion").inc(chunk.tokens)
        if call.first_token_at is None and chunk.text:
            call.first_token_at = time.perf_counter()
            self.metrics.time_to_first_token.labels(*call.labels).observe(
                call.first_token_at - call.received
            )

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        """Read the whole stream into one answer object (`chat.completion`, or the call's
        shape's)."""
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        pieces: dict[int, list[Piece]] = {}
        finish: dict[int, str] = {}
        experts: dict[int, str] = {}  # who wrote each choice (a vote's winner, not its losers)
        async for chunk in self._chunks(call):
            if chunk.keepalive:
                continue
            self._count(call, chunk)
            texts.setdefault(chunk.index, []).append(chunk.text)
            if chunk.text:
                experts.setdefault(chunk.index, chunk.expert)
            logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)
            pieces.setdefault(chunk.index, []).extend(_pieces(chunk))
            if chunk.finish_reason:
                finish[chunk.index] = chunk.finish_reason
        choices = []
        for i in range(call.shape.choices):
            text: str | None = "".join(texts.get(i, []))
            calls: list[ToolCall] = []
            if call.chat.generation.calls_tools and text:
                text, calls = self._tool_reader(call, experts[i]).parse(text)
                calls = allowed_calls(calls, call.chat.generation.parallel_tool_calls)
            reason = "tool_calls" if calls else finish.get(i, "stop")
            lp, pcs = tuple(logprobs.get(i, [])), tuple(pieces.get(i, []))
            choices.append(call.shape.choice(i, text, reason, lp, pcs, tuple(calls)))
        call.outcome = 200
        return call.envelope.completion(choices, call.usage(), call.chorus())

    async def stream(
        self, call: ChatCall, deadline_s: float | None = None
    ) -> AsyncGenerator[str, None]:
        """SSE events: an opening chunk per choice (chat's role), content chunks, optional
        usage, then [DONE].

        Once bytes are out the HTTP status stays 200: an error is sent as an error event before
        [DONE], and its status is the call's `outcome`."""
        envelope = call.envelope
        try:
            for i in range(call.shape.choices):
                opening = call.shape.opening(i)
                if opening is not None:
                    yield sse(envelope.chunk([opening], chorus=call.chorus()))
            # A choice's finishing chunk carries the `chorus` object, so it waits for the
            # strategy's end: token-level strategies complete their trace as they finish.
            finishing: list[GenerationChunk] = []
            # With tools, a choice's text goes through its expert's tool-call reader
            # (`ensemble.toolcalls`): content streams, calls go out as `tool_calls` fragments.
            readers: dict[int, CallStream] = {}
            called: set[int] = set()  # the choices that made a call
            parallel = call.chat.generation.parallel_tool_calls
            async for chunk in self._chunks(call, deadline_s):
                if chunk.keepalive:
                    yield SSE_KEEPALIVE
                    continue
                self._count(call, chunk)
                if call.chat.generation.calls_tools and _written(chunk):
                    reader = readers.get(chunk.index)
                    if reader is None:
                        reader = self._tool_reader(call, chunk.expert).stream()
                        readers[chunk.index] = reader
                    out = reader.push(chunk.text, chunk.token_ids)
                    text, fragments = out.content, list(out.calls)
                    if chunk.finish_reason is not None:
                        tail = reader.finish()
                        text, fragments = text + tail.content, fragments + list(tail.calls)
                    fragments = allowed_deltas(fragments, parallel)
                    if text or (chunk.logprobs and call.chat.logprobs):
                        piece = replace(chunk, text=text, finish_reason=None)
                        yield sse(envelope.chunk([self._delta(call, piece)]))
                    for delta in tool_call_deltas(fragments):
                        yield sse(envelope.chunk([delta_choice(chunk.index, delta)]))
                    if fragments:
                        called.add(chunk.index)
                    if chunk.finish_reason is not None:
                        reason = "tool_calls" if chunk.index in called else chunk.finish_reason
                        finishing.append(replace(chunk, text="", logprobs=(), finish_reason=reason))
                elif chunk.finish_reason is not None:
                    finishing.append(chunk)
                elif chunk.text:  # else accounting only: tokens of samples that lost a vote
                    yield sse(envelope.chunk([self._delta(call, chunk)]))
            for chunk in finishing:
                yield sse(envelope.chunk([self._delta(call, chunk)], chorus=call.chorus()))
            if call.chat.include_usage:
                yield sse(envelope.chunk([], usage=call.usage(), chorus=call.chorus()))
            call.outcome = 200
        except GatewayError as exc:
            call.outcome = exc.status_code
            yield sse(exc.to_dict())
        except Exception as exc:  # a defect: the client still gets an error event and [DONE]
            logger.error("request %s failed mid-stream", call.id, exc_info=exc)
            error = InternalError("Internal server error.")
            call.outcome = error.status_code
            yield sse(error.to_dict())
        yield SSE_DONE

    def _tool_reader(self, call: ChatCall, expert: str) -> ToolCallReader:
        """How the expert that wrote a choice reads its tool calls (`ensemble.toolcalls`)."""
        return tool_reader(self.gateway.engines.get(expert), call.chat.generation)

    def _delta(self, call: ChatCall, chunk: GenerationChunk) -> dict[str, Any]:
        return call.shape.delta(
            chunk.index, chunk.text, chunk.finish_reason, chunk.logprobs, _pieces(chunk)
        )


def _written(chunk: GenerationChunk) -> bool:
    """A chunk of a choice's own output (text, logprobs or its end), not one that only
    accounts for tokens (of samples that lost a vote)."""
    return bool(chunk.text or chunk.logprobs or chunk.finish_reason is not None)


def _pieces(chunk: GenerationChunk) -> tuple[Piece, ...]:
    """Who chose each stretch of a chunk's text: a token-level strategy's own account, else
    the chunk's expert alone (a single expert, or a vote's winning sample)."""
    if not chunk.text:
        return ()
    return chunk.pieces or (Piece(chunk.text, chunk.expert, {chunk.expert: 1.0}),)


def _check_raw_prompts(target: Target) -> None:
    """Raw prompts are for one model's own continuation: a vote reads answers out of replies
    and fusion aligns experts' chat answers, so only experts and `single` pools take them."""
    if target.strategy.name != "single":
        raise InvalidRequestError(
            f"`{target.model_id}` is a `{target.strategy.name}` pool: /v1/completions is served "
            "by experts and `single` pools only (use /v1/chat/completions)",
            param="model",
        )


def _routed_messages(
    chat: ChatRequest, prompts: tuple[GenerationRequest, ...]
) -> tuple[ChatMessage, ...]:
    """What a router reads: the chat's messages, or the raw prompts as one user message."""
    if not prompts:
        return chat.generation.messages
    return (ChatMessage("user", "\n".join(p.prompt or "" for p in prompts)),)
