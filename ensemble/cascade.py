"""The `cascade` strategy: a cheap expert drafts; a stronger one takes over while it is unsure.

Entropy Adaptive Decoding (Simonds 2025): at each step the draft expert's next-token entropy
(the engines' shared top-20 estimate, so a threshold means the same on every engine) joins a
rolling window; while the window's mean exceeds `threshold` (nats), the strong expert
chooses the token, otherwise the draft's own choice stands. Both continue from the same text.
If one of them fails, the other carries on alone. Under a budget (`ensemble.budget`) one whose
session does not fit is left out from the start: the strong expert alone, or the draft alone.

The strong expert catches up with the chosen text in the background while the draft decides, so
its view is ready when it is next needed. With `draft_tokens` > 1 (and sessions that can look
ahead), each round the draft expert goes ahead along its own greedy path, its views computed
together; where its entropy window would pass the threshold, the strong expert's view is
computed ahead over the drafted text in one pass; the steps then run exactly as above, reading
what was computed ahead, until one chooses other than the draft (as in `ensemble.fuse`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from functools import partial

from ensemble.budget import Budget
from ensemble.engine import Engine
from ensemble.stepwise import (
    DraftRounds,
    Picker,
    StepObserver,
    Stepper,
    greedy_top,
    session_engines,
    sole_weights,
    speculative_steps,
)
from ensemble.types import (
    Candidate,
    CascadeSummary,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    NextTokens,
)


class CascadeStrategy:
    name = "cascade"
    max_n: int | None = 1
    # Its pieces are chosen across experts: no one expert's grammar masks them (yet).
    honours: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        draft: str | None = None,
        window: int = 4,
        threshold: float = 1.0,
        candidates: int = 10,
        max_tokens: int = 256,
        draft_tokens: int = 1,
        observer: StepObserver | None = None,
    ) -> None:
        self.draft = draft
        self.window = window
        self.threshold = threshold
        self.candidates = candidates
        self.max_tokens = max_tokens
        self.draft_tokens = draft_tokens  # at most, per round; 1: step by step
        self.observer = observer

    def _order(self, experts: Sequence[Engine]) -> list[Engine]:
        """[strong, draft]: the named draft (else the last routed expert) and the best other."""
        draft = next((e for e in experts if e.name == self.draft), experts[-1])
        strong = next(e for e in experts if e is not draft) if len(experts) > 1 else draft
        return [strong, draft] if strong is not draft else [draft]

    async def run(
        self,
        request: GenerationRequest,
        experts: Sequence[Engine],
        trace: EnsembleTrace,
        budget: Budget | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        max_tokens = request.params.max_tokens or self.max_tokens
        engines = session_engines(self._order(experts), self.name)
        engines, unpriced = await (budget or Budget()).admit_group(engines, request, max_tokens)
        trace.failed.extend(unpriced)
        names = [e.name for e in engines]
        # The strong expert is session 0: its tokenizer defines the output, like a fuse primary.
        picker = Picker.of(request.params)
        stepper = await Stepper.open(engines, request, max_tokens, self.observer)
        recent: deque[float] = deque(maxlen=self.window)  # the draft's latest entropies
        rounds = DraftRounds(self.draft_tokens)
        try:
            steps = speculative_steps(
                stepper,
                rounds,
                partial(self._lookahead, stepper, recent),
                partial(self._step, stepper, picker, recent),
            )
            async with aclosing(steps):  # a client that leaves closes it at once
                async for chunk in steps:
                    yield chunk
            for chunk in stepper.accounting():
                yield chunk
        finally:
            await stepper.aclose()
            self._record(trace, stepper, names, rounds)

    async def _lookahead(
        self, stepper: Stepper, recent: deque[float], length: int
    ) -> list[Candidate]:
        """A round's draft: the draft expert's greedy pieces up to the first step the strong
        expert will decide (included), and the strong expert's view there computed ahead. None
        without drafts, or with one expert left."""
        if self.draft_tokens < 2 or len(stepper.sessions) < 2:
            return []
        views = await stepper.draft(length, self.candidates, len(stepper.sessions) - 1)
        window = deque(recent, maxlen=self.window)
        tops: list[Candidate] = []
        for view in views:
            window.append(view.entropy)
            if sum(window) / len(window) > self.threshold:
                await stepper.prefetch(0, "".join(top.text for top in tops))
                return [*tops, greedy_top(view)]
            tops.append(greedy_top(view))
        return tops

    async def _step(
        self, stepper: Stepper, picker: Picker, recent: deque[float]
    ) -> tuple[GenerationChunk | None, Candidate | None]:
        """One step: the draft's view, and the strong expert's while the draft is unsure (its
        recent entropies average above `threshold`); the one deciding takes its own choice.
        Returns what to stream and the piece chosen (None where the draft failed)."""
        started = time.perf_counter()
        draft = len(stepper.sessions) - 1  # 0 once either expert has failed
        draft_view = await stepper.try_view(draft, self.candidates)
        if draft_view is None:  # it failed and was dropped: the strong expert carries on alone
            return None, None
        recent.append(draft_view.entropy)
        views: list[NextTokens | None]
        if draft > 0 and sum(recent) / len(recent) > self.threshold:
            views, chooser = await self._escalated(stepper, draft_view), 0
        else:
            views, chooser = [*[None] * draft, draft_view], draft
        view = views[chooser]
        assert view is not None
        chosen = picker.own(view)
        live = stepper.experts
        weights = sole_weights(live, chooser)
        chunk = stepper.choose(
            chosen,
            views,
            producer=live[chooser],
            weights=weights,
            gated=False,
            started=started,
            distribution=view.candidates,
        )
        if chooser > 0 and not stepper.finished:  # the strong one catches up meanwhile
            stepper.warm(0)
        return chunk, chosen

    async def _escalated(self, stepper: Stepper, draft_view: NextTokens) -> list[NextTokens | None]:
        """The views for a step the strong expert decides: its own and the draft's. If it fails,
        it is dropped and the draft's view is the only one (the draft, now session 0, decides)."""
        strong = await stepper.try_view(0, self.candidates)
        return [draft_view] if strong is None else [strong, draft_view]

    def _record(
        self, trace: EnsembleTrace, stepper: Stepper, names: list[str], rounds: DraftRounds
    ) -> None:
        """The trace: each expert's share of the pieces as its weight, those that failed, and
        the cascade summary."""
        shares = stepper.shares()
        trace.experts.extend(names)
        trace.weights.extend(shares[n] for n in names)
        trace.failed.extend(stepper.failed)
        trace.cascade = CascadeSummary(
            names[-1], stepper.steps, shares, rounds.acceptance, rounds.mean_length
        )
