"""The `cascade` strategy: a cheap expert drafts; a stronger one takes over while it is unsure.

Entropy Adaptive Decoding (Simonds 2025): at each step the draft expert's next-token entropy
joins a rolling window; while the window's mean exceeds `threshold` (nats), the strong expert
chooses the token, otherwise the draft's own choice stands. Both continue from the same text.
If one of them fails, the other carries on alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence

import numpy as np

from ensemble.engine import Engine
from ensemble.errors import ExpertFailed
from ensemble.stepwise import StepObserver, Stepper, own_choice, session_engines
from ensemble.types import (
    CascadeSummary,
    EnsembleTrace,
    GenerationChunk,
    GenerationRequest,
    NextTokens,
)


class CascadeStrategy:
    name = "cascade"
    max_n: int | None = 1

    def __init__(
        self,
        *,
        draft: str | None = None,
        window: int = 4,
        threshold: float = 1.0,
        candidates: int = 10,
        max_tokens: int = 256,
        observer: StepObserver | None = None,
    ) -> None:
        self.draft = draft
        self.window = window
        self.threshold = threshold
        self.candidates = candidates
        self.max_tokens = max_tokens
        self.observer = observer

    def _order(self, experts: Sequence[Engine]) -> list[Engine]:
        """[strong, draft]: the named draft (else the last routed expert) and the best other."""
        draft = next((e for e in experts if e.name == self.draft), experts[-1])
        strong = next(e for e in experts if e is not draft) if len(experts) > 1 else draft
        return [strong, draft] if strong is not draft else [draft]

    async def run(
        self, request: GenerationRequest, experts: Sequence[Engine], trace: EnsembleTrace
    ) -> AsyncGenerator[GenerationChunk, None]:
        engines = session_engines(self._order(experts), self.name)
        names = [e.name for e in engines]
        params = request.params
        # The strong expert is session 0: its tokenizer defines the output, like a fuse primary.
        stepper = await Stepper.open(engines, request, params.max_tokens or self.max_tokens)
        temperature = params.temperature if params.temperature is not None else 0.0
        top_p = params.top_p if params.top_p is not None else 1.0
        rng = np.random.default_rng(params.seed)
        recent: deque[float] = deque(maxlen=self.window)
        stepper.observer = self.observer
        try:
            while not stepper.finished:
                started = time.perf_counter()
                draft_index = len(stepper.sessions) - 1  # 0 once either expert has failed
                try:
                    draft_view = await stepper.view(draft_index, self.candidates)
                except ExpertFailed as exc:
                    await stepper.drop([draft_index], exc)
                    continue
                recent.append(draft_view.entropy)
                escalate = draft_index > 0 and sum(recent) / len(recent) > self.threshold
                views: list[NextTokens | None] = [None] * len(stepper.sessions)
                views[draft_index] = draft_view
                chooser = draft_index
                if escalate:
                    try:
                        views[0] = await stepper.view(0, self.candidates)
                        chooser = 0
                    except ExpertFailed as exc:
                        await stepper.drop([0], exc)
                        views, chooser = [draft_view], 0
                view = views[chooser]
                assert view is not None
                chosen = own_choice(view, temperature, top_p, rng)
                live = stepper.experts
                weights = {n: float(i == chooser) for i, n in enumerate(live)}
                chunk = stepper.choose(
                    chosen, views, producer=live[chooser], weights=weights, gated=False,
                    started=started,
                )  # fmt: skip
                if chunk is not None:
                    yield chunk
            for chunk in stepper.accounting():
                yield chunk
        finally:
            await stepper.aclose()
            shares = stepper.shares()
            trace.experts.extend(names)
            trace.weights.extend(shares[n] for n in names)
            trace.failed.extend(stepper.failed)
            trace.cascade = CascadeSummary(names[-1], stepper.steps, shares)
