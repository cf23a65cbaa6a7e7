"""The `dlf` strategy: Dynamic Logit Fusion, small specialists steering a large model.

The pool's experts share one vocabulary and have fixed roles: the `large` model, the small
`base` model, and specialists fine-tuned from that base (`chorus finetune`). Every step each
gives its whole next-token distribution, and the answer's token is chosen from
`softmax(M_L + sum_t a_t (M_t - M_S))`, each `a_t` found by the paper's KL-matching grid search
(`ensemble.logit_fusion`) or fixed by the config. It runs on the `fuse` strategy's loop, so
streaming, stop strings, sampling, expert failures and draft-and-verify rounds (the large model
drafts, the small ones score the draft in one pass) are the same.

The trace's weights are each expert's mean logit coefficient over the steps: 1 for the large
model, the mean `a_t` for each specialist, and minus their sum for the base. An expert that fails
is left out: without the base or the large model, or with no specialist left, whoever leads
decides alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensemble import logit_fusion
from ensemble.engine import Engine, SessionEngine
from ensemble.fuse import FusionStrategy, choose_in_vocabulary
from ensemble.stepwise import Picker, StepObserver, sole_weights
from ensemble.types import Candidate, NextTokens


class LogitFusionStrategy(FusionStrategy):
    name = "dlf"

    def __init__(
        self,
        *,
        large: str,
        base: str,
        alpha: float | None = None,
        max_alpha: float = 2.0,
        alpha_step: float = 0.1,
        candidates: int = 10,
        max_tokens: int = 256,
        draft_tokens: int = 1,
        observer: StepObserver | None = None,
    ) -> None:
        super().__init__(
            weighting="dlf",
            candidates=candidates,
            max_tokens=max_tokens,
            draft_tokens=draft_tokens,
            observer=observer,
        )
        self.large = large
        self.base = base
        self.alpha = alpha
        self.grid = logit_fusion.grid(max_alpha, alpha_step)

    def _engines(self, experts: Sequence[Engine]) -> list[SessionEngine]:
        """The large model first (it leads and drafts), the base, then the specialists."""
        engines = super()._engines(experts)
        by_name = {e.name: e for e in engines}
        if self.large not in by_name or self.base not in by_name:
            raise ValueError(f"`dlf` needs its large ({self.large}) and base ({self.base}) experts")
        rest = [e for e in engines if e.name not in (self.large, self.base)]
        return [by_name[self.large], by_name[self.base], *rest]

    def _fuse(
        self,
        views: list[NextTokens],
        names: list[str],
        primary_top: Candidate,  # noqa: ARG002 (the choice is made over the vocabulary)
        picker: Picker,
    ) -> tuple[Candidate, dict[str, float], str, list[Candidate]]:
        roles = dict(zip(names, views, strict=True))
        specialists = [n for n in names if n not in (self.large, self.base)]
        if self.large not in roles or self.base not in roles or not specialists:
            return picker.own(views[0]), sole_weights(names, 0), names[0], list(views[0].candidates)
        # One vocabulary, but a model's output layer may be padded past it: the common width.
        width = min(len(v.distribution) for v in views if v.distribution is not None)
        large = _distribution(roles[self.large], width)
        base = _distribution(roles[self.base], width)
        experts = [_distribution(roles[n], width) for n in specialists]
        alphas = [
            self.alpha
            if self.alpha is not None
            else logit_fusion.search_alpha(large, base, e, self.grid)
            for e in experts
        ]
        steered = logit_fusion.steer(large, base, experts, alphas)
        chosen, pool = choose_in_vocabulary(views, steered, picker, self.candidates)
        weights = {
            self.large: 1.0,
            self.base: -float(sum(alphas)),
            **dict(zip(specialists, alphas, strict=True)),
        }
        return (
            chosen,
            weights,
            self._producer(chosen, large, base, experts, alphas, specialists),
            pool,
        )

    def _producer(
        self,
        chosen: Candidate,
        large: np.ndarray,
        base: np.ndarray,
        experts: Sequence[np.ndarray],
        alphas: Sequence[float],
        specialists: Sequence[str],
    ) -> str:
        """The large model, unless the specialists moved the choice off its own top token: then
        the specialist that pushed the chosen token up the most."""
        if len(chosen.token_ids) != 1 or int(np.argmax(large)) == chosen.token_ids[0]:
            return self.large
        token = chosen.token_ids[0]
        pushes = [a * (e[token] - base[token]) for e, a in zip(experts, alphas, strict=True)]
        best = int(np.argmax(pushes))
        return specialists[best] if pushes[best] > 0 else self.large


def _distribution(view: NextTokens, width: int) -> np.ndarray:
    if view.distribution is None:  # the config refuses engines that cannot give them
        raise ValueError("`dlf` needs whole next-token distributions")
    return np.asarray(view.distribution[:width], dtype=np.float64)
