"""`chorus router curve`'s table, JSON and plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from router.curve import Curve, random_mixing


def print_curve(curve: Curve, unit: str) -> None:
    names = list(curve.experts)
    print(
        f"{'alpha':>6} {'accuracy':>9} {'cost':>10}  " + "  ".join(f"{n[:14]:>14}" for n in names)
    )
    for p in curve.points:
        mark = " *" if p.pareto else ""
        shares = "  ".join(f"{p.share[n]:>14.0%}" for n in names)
        print(f"{p.quality_weight:>6.2f} {p.accuracy:>9.3f} {p.cost:>10.4g}  {shares}{mark}")
    print("(* on the Pareto front against every other point and every single expert)")
    print(f"cost scale: {curve.cost_scale}")
    for name, (accuracy, cost) in curve.experts.items():
        print(f"expert {name}: accuracy {accuracy:.3f}, cost {cost:.4g} {unit} per query")
    print(
        f"mean gain over random mixing {curve.mean_gain:+.4f}, APGR {curve.apgr:.3f}, "
        f"every point at or above random mixing: {curve.above_random}"
    )
    if curve.target is not None and curve.target_ratio is not None:
        best = curve.best_expert
        print(
            f"target: alpha {curve.target.quality_weight:.2f} keeps accuracy "
            f"{curve.target.accuracy:.3f} ({curve.target.accuracy / curve.experts[best][0]:.1%} "
            f"of {best}) at {curve.target_ratio:.1%} of its cost"
        )
    for note in curve.notes:
        print(note)


def write_curve(curve: Curve, out: Path, *, unit: str, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    payload = asdict(curve) | {"unit": unit, "command": command, "best_expert": curve.best_expert}
    (out / "curve.json").write_text(json.dumps(payload, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    costs = [p.cost for p in curve.points]
    ax.plot(costs, [p.accuracy for p in curve.points], "o-", label="routed, alpha from 0 to 1")
    for p in curve.points[:: max(1, len(curve.points) // 5)]:
        ax.annotate(f"{p.quality_weight:.2f}", (p.cost, p.accuracy), fontsize=7)
    spread = [c for _, c in curve.experts.values()] + costs
    xs = np.linspace(min(spread), max(spread), 200)
    ax.plot(xs, [random_mixing(curve.experts, x) for x in xs], "--", color="grey",
            label="random mixing of experts")  # fmt: skip
    for name, (accuracy, cost) in curve.experts.items():
        ax.plot(cost, accuracy, "s", markersize=8, label=name)
    if curve.target is not None:
        label = f"target (alpha {curve.target.quality_weight:.2f})"
        ax.plot(curve.target.cost, curve.target.accuracy, "*", markersize=16, color="gold",
                markeredgecolor="black", label=label)  # fmt: skip
    ax.set_xlabel(f"mean cost per query ({unit})")
    ax.set_ylabel("accuracy")
    ax.set_title("Quality for cost (chorus router curve)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)
