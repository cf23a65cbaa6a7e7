"""What an expert's answer costs: a price per token, or seconds measured by calibration.

An operator may price an expert (`price` in the YAML: per million prompt and completion tokens,
in a unit it names). An expert with no price costs what calibration measured on the machine it
ran on: seconds per prompt token and per completion token, fitted by non-negative least squares
to every calibration answer's tokens and seconds. Either way a cost is `prompt_tokens * a +
completion_tokens * b`, so the router, the curve and the per-request accounting agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MEASURED_UNIT = "seconds"  # of the calibration machine, for experts with no price


@dataclass(frozen=True, slots=True)
class CostModel:
    unit: str
    per_prompt_token: float
    per_completion_token: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.per_prompt_token + completion_tokens * self.per_completion_token

    @classmethod
    def priced(
        cls, prompt_per_million: float, completion_per_million: float, unit: str
    ) -> CostModel:
        return cls(unit, prompt_per_million / 1e6, completion_per_million / 1e6)

    def as_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "per_prompt_token": self.per_prompt_token,
            "per_completion_token": self.per_completion_token,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostModel:
        return cls(
            str(data["unit"]), float(data["per_prompt_token"]), float(data["per_completion_token"])
        )


def measured_rates(tokens: Sequence[tuple[int, int]], seconds: Sequence[float]) -> CostModel:
    """Seconds per prompt and per completion token that best explain the measured answers."""
    from scipy.optimize import nnls

    if not tokens:
        raise ValueError("no measured answers to fit seconds per token from")
    a = np.asarray(tokens, dtype=np.float64)
    b = np.asarray(seconds, dtype=np.float64)
    (per_prompt, per_completion), _ = nnls(a, b)
    return CostModel(MEASURED_UNIT, float(per_prompt), float(per_completion))


def one_unit(models: Mapping[str, CostModel], where: str) -> str:
    """The unit every expert of a pool is costed in; experts in different units cannot be
    compared, so that is an error naming them."""
    units = {m.unit for m in models.values()}
    if len(units) > 1:
        detail = ", ".join(f"{name}: {m.unit}" for name, m in sorted(models.items()))
        raise ValueError(
            f"{where}: the experts' costs are in different units ({detail}); price every expert "
            "of the pool in one unit, or none (then all cost the seconds calibration measured)"
        )
    return units.pop() if units else MEASURED_UNIT
