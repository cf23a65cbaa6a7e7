"""The `fuse` strategy: several experts decode one answer together, token by token.

Each step the primary (the router's first choice, whose tokenizer defines the output) gives its
next-token candidates. If it is sure (top probability >= `gate`), its token is taken without
asking the others (GaC's thresholded mode). Otherwise every expert gives its candidates, they are
aligned on text (`ensemble.fusion`), weighted (uniform, static, CoRE consistency, or a
KL-centroid mix for experts sharing a vocabulary), fused, and one piece is chosen; every expert
then continues from the same text.

Speculative fusion (after SpecEn, Fu et al. 2025): where the sessions can look ahead
(`LookaheadSession`), each round the primary drafts up to `draft_tokens` pieces along its own
greedy path, every other expert computes its views over the drafted text in one forward pass,
and the steps then run exactly as above, their views read from what was computed ahead, until a
step chooses other than the draft. The choice of every step is the step-by-step one: a view not
computed ahead (another tokenization of the text than guessed) is computed as before. The draft
length follows the acceptance: one more after a round accepted whole, one past the accepted
steps otherwise.

An expert that fails (or times out) is left out and the others carry on; if it was the primary,
the next one takes over. The request fails only when every expert has failed. Under a budget
(`ensemble.budget`) the experts whose sessions do not fit are left out from the start.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import numpy as np

from ensemble import fusion
from ensemble.budget import Budget
from ensemble.engine import Engine, SessionEngine
from ensemble.errors import ExpertFailed
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
    EnsembleTrace,
    FusionSummary,
    GenerationChunk,
    GenerationRequest,
    NextTokens,
)

Weighting = Literal["uniform", "static", "core", "kl_centroid", "dlf"]


@dataclass(slots=True)
class _Tally:
    """What one fusion's trace reports, counted as it runs."""

    weight_sums: dict[str, float]  # each expert's weights summed over the fused steps
    fused: int = 0  # steps the experts' views were fused
    gated: int = 0  # steps the primary decided alone while others were live

    def add_fused(self, weights: Mapping[str, float]) -> None:
        self.fused += 1
        for name, weight in weights.items():
            self.weight_sums[name] += weight


class FusionStrategy:
    name = "fuse"
    max_n: int | None = 1
    # Its pieces are chosen across experts: no one expert's grammar masks them (yet).
    honours: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        weighting: Weighting = "uniform",
        weights: Mapping[str, float] | None = None,
        candidates: int = 10,
        gate: float | None = None,
        beta: float = 2.0,
        max_tokens: int = 256,
        draft_tokens: int = 1,
        observer: StepObserver | None = None,
    ) -> None:
        self.weighting = weighting
        self.weights = dict(weights or {})
        self.candidates = candidates
        self.gate = gate
        self.beta = beta
        self.max_tokens = max_tokens
        self.draft_tokens = draft_tokens  # at most; 1: step by step
        self.observer = observer

    async def run(
        self,
        request: GenerationRequest,
        experts: Sequence[Engine],
        trace: EnsembleTrace,
        budget: Budget | None = None,
    ) -> AsyncGenerator[GenerationChunk, None]:
        max_tokens = request.params.max_tokens or self.max_tokens
        engines = self._engines(experts)
        engines, unpriced = await (budget or Budget()).admit_group(engines, request, max_tokens)
        trace.failed.extend(unpriced)
        picker = Picker.of(request.params)
        stepper = await Stepper.open(engines, request, max_tokens, self.observer)
        tally = _Tally(dict.fromkeys((e.name for e in engines), 0.0))
        rounds = DraftRounds(self.draft_tokens)
        try:
            steps = speculative_steps(
                stepper,
                rounds,
                partial(self._draft, stepper),
                partial(self._step, stepper, picker, tally),
            )
            async with aclosing(steps):  # a client that leaves closes it at once
                async for chunk in steps:
                    yield chunk
            for chunk in stepper.accounting():
                yield chunk
        finally:
            await stepper.aclose()
            self._record(trace, stepper, tally, rounds, engines)

    def _engines(self, experts: Sequence[Engine]) -> list[SessionEngine]:
        engines = session_engines(experts, self.name)
        # Defensive: the gateway refuses such pools at start-up (`_check_token_level_pools`).
        if self._full and len({e.vocabulary for e in engines}) > 1:
            raise ValueError(f"`{self.weighting}` needs experts that share one vocabulary")
        return engines

    @property
    def _full(self) -> bool:
        """Whether views carry whole distributions (fused by `kl_centroid` and `dlf`)."""
        return self.weighting in ("kl_centroid", "dlf")

    async def _draft(self, stepper: Stepper, length: int) -> list[Candidate]:
        """A round's draft: the primary's greedy pieces, and the others' views over them
        computed ahead, up to the last step the primary will not decide alone. None when the
        primary decides alone anyway, or cannot draft."""
        if self.draft_tokens < 2 or len(stepper.sessions) < 2:
            return []
        views = await stepper.draft(length, self.candidates)
        tops = [greedy_top(v) for v in views]
        asked = [j for j, top in enumerate(tops) if not self._sure(top)]
        if asked and asked[-1] > 0:
            text = "".join(top.text for top in tops[: asked[-1]])
            others = range(1, len(stepper.sessions))
            await asyncio.gather(*(stepper.prefetch(i, text) for i in others))
        return tops

    async def _step(
        self, stepper: Stepper, picker: Picker, tally: _Tally
    ) -> tuple[GenerationChunk | None, Candidate | None]:
        """One step: the primary's view; the others' too unless the primary decides alone (it is
        sure, or the only one left); then the fused choice, or the primary's own. Returns what
        to stream and the piece chosen (None where the primary failed)."""
        started = time.perf_counter()
        if self.gate is None:  # every step fuses: ask every expert at once
            asked = await self._ask(stepper, 0)
            if asked is None:  # the primary failed and was dropped: the next one leads now
                return None, None
            primary, others = asked[0], asked[1:]
            top = greedy_top(primary)
        else:
            view = await stepper.try_view(0, self.candidates, full=self._full)
            if view is None:
                return None, None
            primary, top = view, greedy_top(view)
            others = [] if self._alone(stepper, top) else (await self._ask(stepper, 1) or [])
        names = stepper.experts
        views: list[NextTokens | None]
        if others:
            views = [primary, *others]
            chosen, weights, producer, pool = self._fuse([primary, *others], names, top, picker)
            tally.add_fused(weights)
        else:  # gated, or every other expert failed just now
            views = [primary] + [None] * (len(names) - 1)
            chosen, weights, producer = picker.own(primary), sole_weights(names, 0), names[0]
            pool = list(primary.candidates)
            tally.gated += len(names) > 1
        chunk = stepper.choose(
            chosen,
            views,
            producer=producer,
            weights=weights,
            gated=not others,
            started=started,
            distribution=pool,
        )
        if self.gate is not None and not stepper.finished:
            # The others catch up while the primary works: if it is unsure next, their views
            # are ready or on their way, not asked only after its own.
            for i in range(1, len(stepper.sessions)):
                stepper.warm(i)
        return chunk, chosen

    def _alone(self, stepper: Stepper, top: Candidate) -> bool:
        """Whether the primary decides alone: it is the only expert left, or it is sure."""
        return len(stepper.sessions) == 1 or self._sure(top)

    def _sure(self, top: Candidate) -> bool:
        """Whether the primary's top candidate's probability reaches the gate."""
        return self.gate is not None and math.exp(top.logprob) >= self.gate

    async def _ask(self, stepper: Stepper, first: int) -> list[NextTokens] | None:
        """The views of the experts from `first` on, asked at once (each engine works on its
        own thread); those that fail are dropped. None when the primary was among them."""
        asked = range(first, len(stepper.sessions))
        results = await asyncio.gather(
            *(stepper.view(i, self.candidates, full=self._full) for i in asked),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ExpertFailed):
                raise result
        errors = {i: r for i, r in zip(asked, results, strict=True) if isinstance(r, BaseException)}
        if errors:
            await stepper.drop(list(errors), next(iter(errors.values())))
        if 0 in errors:
            return None
        return [r for r in results if not isinstance(r, BaseException)]

    def _record(
        self,
        trace: EnsembleTrace,
        stepper: Stepper,
        tally: _Tally,
        rounds: DraftRounds,
        engines: Sequence[Engine],
    ) -> None:
        """The trace: each expert's mean weight over the fused steps, those that failed, and
        the fusion summary."""
        weight_sums, fused = tally.weight_sums, tally.fused
        if not fused:  # the primary alone decided every step
            lead = stepper.experts[0] if stepper.sessions else engines[0].name
            weight_sums, fused = {n: float(n == lead) for n in weight_sums}, 1
        trace.experts.extend(weight_sums)
        trace.weights.extend(round(w / fused, 6) for w in weight_sums.values())
        trace.failed.extend(stepper.failed)
        steps = max(stepper.steps, 1)
        trace.fusion = FusionSummary(
            self.weighting,
            stepper.steps,
            stepper.shares(),
            round(tally.gated / steps, 4) if len(engines) > 1 else 0.0,
            rounds.acceptance,
            rounds.mean_length,
        )

    def _fuse(
        self, views: list[NextTokens], names: list[str], primary_top: Candidate, picker: Picker
    ) -> tuple[Candidate, dict[str, float], str, list[Candidate]]:
        """The fused choice, each expert's weight, the expert credited with the choice, and the
        fused candidates it was chosen from."""
        if self.weighting == "kl_centroid":
            chosen, weights, producer, pool = self._fuse_kl_centroid(views, names, picker)
        else:
            chosen, weights, producer, pool = self._fuse_aligned(views, names, primary_top, picker)
        return chosen, dict(zip(names, map(float, weights), strict=True)), producer, pool

    def _fuse_aligned(
        self, views: list[NextTokens], names: list[str], primary_top: Candidate, picker: Picker
    ) -> tuple[Candidate, np.ndarray, str, list[Candidate]]:
        keys = fusion.union_keys(views)
        matrix = fusion.expert_matrix(views, keys)
        filters = None
        if self.weighting == "core":
            weights, filters = fusion.core_weights(matrix, self.beta)
        elif self.weighting == "static":
            weights = fusion.static_weights(names, self.weights)
        else:
            weights = fusion.uniform_weights(len(names))
        fused = fusion.fuse(matrix, weights, filters)
        pool = [
            Candidate(k, math.log(max(p, 1e-300)), (), end=k == fusion.END)
            for k, p in zip(keys, fused, strict=True)
        ]
        index = picker.pick(keys, fused, primary_top.text)
        producer = names[int(np.argmax(weights * matrix[:, index]))]
        return pool[index], weights, producer, pool

    def _fuse_kl_centroid(
        self, views: list[NextTokens], names: list[str], picker: Picker
    ) -> tuple[Candidate, np.ndarray, str, list[Candidate]]:
        dists = [np.asarray(v.distribution, dtype=np.float64) for v in views]
        weights = fusion.kl_centroid_weights(dists)
        pooled = fusion.log_linear(dists, weights)
        chosen, pool = choose_in_vocabulary(views, pooled, picker, self.candidates)
        if len(chosen.token_ids) != 1:  # no fused candidate had a view's text: the primary's
            return chosen, weights, names[0], pool
        token = chosen.token_ids[0]
        credit = [w * math.exp(d[token]) for w, d in zip(weights, dists, strict=True)]
        return chosen, weights, names[int(np.argmax(credit))], pool


def choose_in_vocabulary(
    views: Sequence[NextTokens], pooled: np.ndarray, picker: Picker, k: int
) -> tuple[Candidate, list[Candidate]]:
    """Pick from a fused distribution over the experts' shared vocabulary (`pooled`, log-probs
    by token id); the choice is among its `k` most likely tokens that some expert's view holds as
    a candidate, whose text that view gives. Returns the choice and those candidates with their
    fused probabilities."""
    top_ids = np.argsort(-pooled)[:k]
    by_id = {c.token_ids[0]: c for v in views for c in v.candidates if len(c.token_ids) == 1}
    options = [by_id[i] for i in top_ids if i in by_id] or [views[0].candidates[0]]
    probs = np.exp([pooled[c.token_ids[0]] if c.token_ids else -50.0 for c in options])
    probs = probs / probs.sum()
    keys = [c.text for c in options]
    chosen = options[picker.pick(keys, probs, keys[0])]
    return chosen, [replace(c, logprob=math.log(p)) for c, p in zip(options, probs, strict=True)]
