"""The `vote` strategy: self-consistency over the top expert, escalating to the next one.

Avengers' recipe: n samples from the top routed expert in one engine call, majority over the
extracted answers. When that expert agrees with itself less than `escalate_below`, the next routed
expert's samples join the vote, each sample weighted by its expert's consistency
(`ensemble.voting`). By default the next expert samples concurrently from the start and its work
is cancelled when the vote does not need it. The reply is the winning sample's own text.

An expert that fails is skipped: the next routed expert takes its place (listed in
`trace.failed`); the request fails only when every expert it needed has failed.

Under a budget (`ensemble.budget`) each expert's samples are trimmed to what fits, an expert
none of whose samples fits is passed over (a vote that would escalate to it does not), and the
next expert samples early only if all its samples fit beside the top one's.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import cast

from ensemble.answers import AnswerFormat, extract
from ensemble.budget import Budget, CallKind, Grant
from ensemble.engine import Engine
from ensemble.errors import ExpertFailed
from ensemble.structured import STRUCTURED, canonical_reply
from ensemble.toolcalls import tool_reader
from ensemble.types import (
    EnsembleTrace,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    VoteSummary,
)
from ensemble.voting import Sample, consistency_weights, top_share, vote

# How a sample's answer is read: from its expert's name and its text.
_Read = Callable[[str, str], str | None]


@dataclass(slots=True)
class _Sampled:
    """One sample as it arrives: its chunks (re-sent if it wins) and what it cost."""

    expert: str
    chunks: list[GenerationChunk] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    @property
    def finish_reason(self) -> FinishReason:
        return next((c.finish_reason for c in reversed(self.chunks) if c.finish_reason), "stop")

    def mean_logprob(self) -> float:
        values = [lp.logprob for c in self.chunks for lp in c.logprobs]
        return sum(values) / len(values) if values else -math.inf


@dataclass(frozen=True, slots=True)
class _Run:
    expert: str
    samples: list[_Sampled]
    prompt_tokens: int


@dataclass(slots=True)
class _Poll:
    """One vote's sampling: the runs gathered, the experts that failed, and the sampling tasks
    started but not yet awaited (the next expert's, started early when `concurrent`), each
    with what the budget granted it."""

    experts: Sequence[Engine]
    request: GenerationRequest  # the samples' request: n samples, with logprobs
    budget: Budget
    runs: list[_Run] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    tasks: dict[int, tuple[asyncio.Task[_Run], asyncio.Event, Grant]] = field(default_factory=dict)

    async def start(self, i: int, call: CallKind, *, early: bool = False) -> bool:
        """Start expert `i` sampling, if there is such an expert and the budget admits it (as
        many samples as fit; `early`, all of them or none, and no cut recorded: it may never
        be needed). Whether it is sampling."""
        if i >= len(self.experts):
            return False
        if i in self.tasks:
            return True
        expert = self.experts[i]
        try:
            grant = await self.budget.admit(
                expert, self.request, call, samples=True, trim=not early, record=not early
            )
        except ExpertFailed:
            if not early:
                raise
            return False  # priced again when it is needed, and failed then
        if grant is None:
            return False
        started = asyncio.Event()
        task = asyncio.create_task(_sample(expert, grant.request, started))
        self.tasks[i] = (task, started, grant)
        return True

    async def cancel(self) -> None:
        """Stop the tasks not awaited (not needed, or the client left); their samples are never
        accounted, so their cost goes back to the budget."""
        for task, _, grant in self.tasks.values():
            task.cancel()
            self.budget.release(grant)
        await asyncio.gather(*(t for t, _, _ in self.tasks.values()), return_exceptions=True)


class VotingStrategy:
    name = "vote"
    max_n: int | None = 1  # one voted answer per request
    honours = STRUCTURED  # its experts constrain each sample; votes compare canonical JSON

    def __init__(
        self,
        *,
        samples: int = 5,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        escalate_below: float = 0.8,
        answer_format: AnswerFormat = "auto",
        keepalive_s: float = 1.0,
        concurrent: bool = True,
    ) -> None:
        self.samples = samples
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.escalate_below = escalate_below
        self.answer_format = answer_format
        self.keepalive_s = keepalive_s
        self.concurrent = concurrent

    async def run(
        self,
        request: GenerationRequest,
        experts: Sequence[Engine],
        trace: EnsembleTrace,
        budget: Budget | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        read = self._reader(request, experts)
        poll = _Poll(experts, self._sampling(request), budget or Budget())
        async with aclosing(self._gather(poll, read)) as keepalives:
            async for keepalive in keepalives:
                yield keepalive
        trace.failed.extend(poll.failed)
        winner = self._count(poll.runs, trace, read)
        for chunk in _reply(poll.runs, winner):
            yield chunk

    def _reader(self, request: GenerationRequest, experts: Sequence[Engine]) -> _Read:
        """How a sample's answer is read (given its expert and text): a structured reply (tool
        calls, as its expert's engine reads them; JSON) by its canonical JSON value, so
        `{"a": 1}` and `{ "a":1 }` agree; free text by the answer format."""
        if request.calls_tools:
            engines = {e.name: e for e in experts}
            return lambda expert, text: canonical_reply(
                text, tool_reader(engines.get(expert), request)
            )
        if request.response_format is not None:
            return lambda _, text: canonical_reply(text, None)
        fmt = cast(AnswerFormat, request.answer_format or self.answer_format)
        return lambda _, text: extract(text, fmt)

    def _sampling(self, request: GenerationRequest) -> GenerationRequest:
        params = replace(
            request.params,
            n=self.samples,
            # The request's own sampling wins; the pool's defaults keep samples diverse.
            temperature=_given(request.params.temperature, self.temperature),
            top_p=_given(request.params.top_p, self.top_p),
            max_tokens=request.params.max_tokens or self.max_tokens,
            logprobs=True,  # ties are broken by mean token log-probability
        )
        return replace(request, params=params)

    async def _gather(self, poll: _Poll, read: _Read) -> AsyncGenerator[GenerationChunk, None]:
        """The runs the vote needs, into `poll`: the top expert's, and the next one's too when
        the top one agrees with itself less than `escalate_below`. A failed expert is skipped
        and the next takes its place. Streams keep-alive chunks while experts sample."""
        wanted, beating = 1, False  # runs the vote needs; whether a byte (keep-alive) went out
        failure: ExpertFailed | None = None
        try:
            for i, expert in enumerate(poll.experts):
                if len(poll.runs) == wanted:
                    break
                call: CallKind = (
                    "escalation" if poll.runs else "answer" if not poll.failed else "fallback"
                )
                try:
                    if not await poll.start(i, call):
                        continue  # it does not fit the budget: the next one may
                except ExpertFailed as exc:  # pricing it (counting its prompt) failed
                    poll.failed.append(expert.name)
                    failure = exc
                    continue
                if self.concurrent:  # sample the next one now; dropped if the vote needs it not
                    await poll.start(i + 1, "escalation", early=True)
                task, started, grant = poll.tasks.pop(i)
                try:
                    # Until a byte is out, wait for content first: an early failure stays clean.
                    async for beat in self._heartbeats(task, None if beating else started):
                        beating = True
                        yield beat
                    poll.runs.append(task.result())
                except ExpertFailed as exc:
                    poll.budget.release(grant)  # its samples are never accounted
                    poll.failed.append(expert.name)
                    failure = exc
                    continue
                if wanted == 1 and top_share(_samples(poll.runs, read)) < self.escalate_below:
                    wanted = 2  # the top expert disagrees with itself: ask the next one
            if not poll.runs:
                raise poll.budget.refusal() if failure is None else poll.budget.explain(failure)
        finally:
            await poll.cancel()

    def _count(self, runs: list[_Run], trace: EnsembleTrace, read: _Read) -> _Sampled:
        """The vote over every run's samples, recorded in `trace`; returns the winning sample."""
        escalated = len(runs) > 1
        samples = _samples(runs, read)
        names = [run.expert for run in runs]
        weights = consistency_weights(samples, names) if escalated else {names[0]: 1.0}
        result = vote(samples, weights)
        trace.experts.extend(names)
        trace.weights.extend(round(weights[n], 6) for n in names)
        trace.vote = VoteSummary(
            result.counts, result.answer, round(result.agreement, 6), escalated
        )
        return [s for run in runs for s in run.samples][result.winner]

    async def _heartbeats(
        self, task: asyncio.Task[_Run], started: asyncio.Event | None
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Keep-alive chunks every `keepalive_s` until `task` ends.

        With `started`, the first comes only once the expert produced content, so a failure
        before that (a prompt too long, say) still propagates before any byte is sent.
        """
        try:
            if started is not None:
                waiter = asyncio.create_task(started.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if task.done():
                    task.result()  # raises the expert's error, if any
                    return
                yield GenerationChunk("", 0, "", 0, 0, keepalive=True)
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=self.keepalive_s)
                if not done:
                    yield GenerationChunk("", 0, "", 0, 0, keepalive=True)
            task.result()
        finally:
            if not task.done():  # the client went away: stop the expert's work
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _sample(expert: Engine, request: GenerationRequest, started: asyncio.Event) -> _Run:
    """One expert's samples, `started` set once it produced content."""
    samples = [_Sampled(expert.name) for _ in range(request.params.n)]
    prompt_tokens = 0
    async for chunk in expert.generate(request):
        started.set()
        prompt_tokens = chunk.prompt_tokens
        samples[chunk.index].chunks.append(chunk)
    return _Run(expert.name, samples, prompt_tokens)


def _reply(runs: list[_Run], winner: _Sampled) -> Iterator[GenerationChunk]:
    """Account for every sample's tokens and every expert's prompt, then re-send the winner."""
    for run in runs:
        losers = sum(s.tokens for s in run.samples if s is not winner)
        yield GenerationChunk(run.expert, 0, "", losers, run.prompt_tokens)
    for chunk in winner.chunks:
        yield replace(chunk, index=0, prompt_tokens=0)


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


def _samples(runs: list[_Run], read: _Read) -> list[Sample]:
    return [
        Sample(run.expert, s.text, read(run.expert, s.text), s.mean_logprob())
        for run in runs
        for s in run.samples
    ]
