"""The `fuse` strategy: several experts decode one answer together, token by token.

Each step the primary (the router's first choice, whose tokenizer defines the output) gives its
next-token candidates. If it is sure (top probability >= `gate`), its token is taken without
asking the others (GaC's thresholded mode). Otherwise every expert gives its candidates, they are
aligned on text (`ensemble.fusion`), weighted (uniform, static, CoRE consistency, or dynamic for
experts sharing a vocabulary), fused, and one piece is chosen; every expert then continues from
the same text.

An expert that fails (or times out) is left out and the others carry on; if it was the primary,
the next one takes over. The request fails only when every expert has failed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Literal

import numpy as np

from ensemble import fusion
from ensemble.engine import Engine
from ensemble.errors import ExpertFailed
from ensemble.stepwise import StepObserver, Stepper, own_choice, session_engines
from ensemble.types import (
    Candidate,
    EnsembleTrace,
    FusionSummary,
    GenerationChunk,
    GenerationRequest,
    NextTokens,
)

Weighting = Literal["uniform", "static", "core", "dynamic"]


class FusionStrategy:
    name = "fuse"
    max_n: int | None = 1

    def __init__(
        self,
        *,
        weighting: Weighting = "uniform",
        weights: Mapping[str, float] | None = None,
        candidates: int = 10,
        gate: float | None = None,
        beta: float = 2.0,
        max_tokens: int = 256,
        observer: StepObserver | None = None,
    ) -> None:
        self.weighting = weighting
        self.weights = dict(weights or {})
        self.candidates = candidates
        self.gate = gate
        self.beta = beta
        self.max_tokens = max_tokens
        self.observer = observer

    async def run(
        self, request: GenerationRequest, experts: Sequence[Engine], trace: EnsembleTrace
    ) -> AsyncGenerator[GenerationChunk, None]:
        engines = session_engines(experts, self.name)
        if self.weighting == "dynamic" and len({e.vocabulary for e in engines}) > 1:
            raise ValueError("`dynamic` weights need experts that share one vocabulary")
        params = request.params
        max_tokens = params.max_tokens or self.max_tokens
        full = self.weighting == "dynamic"
        stepper = await Stepper.open(engines, request, max_tokens)
        rng = np.random.default_rng(params.seed)
        temperature = params.temperature if params.temperature is not None else 0.0
        top_p = params.top_p if params.top_p is not None else 1.0
        stepper.observer = self.observer
        weight_sums: dict[str, float] = dict.fromkeys((e.name for e in engines), 0.0)
        fused_steps = gated_steps = 0
        try:
            while not stepper.finished:
                started = time.perf_counter()
                try:
                    primary = await stepper.view(0, self.candidates, full=full)
                except ExpertFailed as exc:
                    await stepper.drop([0], exc)
                    continue
                top = max(primary.candidates, key=lambda c: c.logprob)
                gated = len(stepper.sessions) == 1 or (
                    self.gate is not None and math.exp(top.logprob) >= self.gate
                )
                others: list[NextTokens] = []
                if not gated:
                    others = await self._others(stepper, full)
                    gated = not others
                names = stepper.experts
                if gated:
                    views: list[NextTokens | None] = [primary] + [None] * (len(names) - 1)
                    chosen = own_choice(primary, temperature, top_p, rng)
                    step_weights = np.eye(len(names))[0]
                    producer = names[0]
                    gated_steps += len(names) > 1
                else:
                    views = [primary, *others]
                    chosen, step_weights, producer = self._fuse(
                        [primary, *others], names, top, temperature, top_p, rng
                    )
                    fused_steps += 1
                weights = dict(zip(names, map(float, step_weights), strict=True))
                if not gated:
                    for name, weight in weights.items():
                        weight_sums[name] += weight
                chunk = stepper.choose(
                    chosen, views, producer=producer, weights=weights, gated=gated, started=started
                )
                if chunk is not None:
                    yield chunk
            for chunk in stepper.accounting():
                yield chunk
        finally:
            await stepper.aclose()
            steps = max(stepper.steps, 1)
            if not fused_steps:  # the primary alone decided every step
                lead = stepper.experts[0] if stepper.sessions else engines[0].name
                weight_sums, fused_steps = {n: float(n == lead) for n in weight_sums}, 1
            trace.experts.extend(weight_sums)
            trace.weights.extend(round(w / fused_steps, 6) for w in weight_sums.values())
            trace.failed.extend(stepper.failed)
            trace.fusion = FusionSummary(
                self.weighting,
                stepper.steps,
                stepper.shares(),
                round(gated_steps / steps, 4) if len(engines) > 1 else 0.0,
            )

    async def _others(self, stepper: Stepper, full: bool) -> list[NextTokens]:
        """The views of every expert but the primary; those that fail are dropped."""
        results = await asyncio.gather(
            *(stepper.view(i, self.candidates, full=full) for i in range(1, len(stepper.sessions))),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, ExpertFailed):
                raise result
        errors = {i: r for i, r in enumerate(results, start=1) if isinstance(r, BaseException)}
        if errors:
            await stepper.drop(list(errors), next(iter(errors.values())))
        return [r for r in results if not isinstance(r, BaseException)]

    def _fuse(
        self,
        views: list[NextTokens],
        names: list[str],
        primary_top: Candidate,
        temperature: float,
        top_p: float,
        rng: np.random.Generator,
    ) -> tuple[Candidate, np.ndarray, str]:
        if self.weighting == "dynamic":
            return self._fuse_dynamic(views, names, temperature, top_p, rng)
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
        index = fusion.pick(
            keys, fused, primary_top.text, temperature=temperature, top_p=top_p, rng=rng
        )
        key = keys[index]
        producer = names[int(np.argmax(weights * matrix[:, index]))]
        return Candidate(key, math.log(fused[index]), (), end=key == fusion.END), weights, producer

    def _fuse_dynamic(
        self,
        views: list[NextTokens],
        names: list[str],
        temperature: float,
        top_p: float,
        rng: np.random.Generator,
    ) -> tuple[Candidate, np.ndarray, str]:
        # Same vocabulary: fuse whole distributions, then read the text off the primary's view
        # or, for a token outside it, off the expert that proposed it.
        dists = [np.asarray(v.distribution, dtype=np.float64) for v in views]
        weights = fusion.dynamic_weights(dists)
        pooled = fusion.log_linear(dists, weights)
        top_ids = np.argsort(-pooled)[: self.candidates]
        by_id = {c.token_ids[0]: c for v in views for c in v.candidates if len(c.token_ids) == 1}
        options = [by_id[i] for i in top_ids if i in by_id] or [views[0].candidates[0]]
        probs = np.exp([pooled[c.token_ids[0]] if c.token_ids else -50.0 for c in options])
        keys = [c.text for c in options]
        index = fusion.pick(
            keys, probs / probs.sum(), keys[0], temperature=temperature, top_p=top_p, rng=rng
        )
        chosen = options[index]
        token = chosen.token_ids[0]
        credit = [w * math.exp(d[token]) for w, d in zip(weights, dists, strict=True)]
        return chosen, weights, names[int(np.argmax(credit))]
