"""The load test's plots (PNG): latency by concurrency, and the server's RSS over a soak."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_latency(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    targets = [t for t in dict.fromkeys(r["target"] for r in rows) if t != "all"]
    styles = {"p50_s": "-", "p90_s": "--", "p99_s": ":"}
    for i, target in enumerate(targets):
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        for key, style in styles.items():
            ax.plot(
                xs,
                [r[key] for r in mine],
                style,
                marker="o",
                color=f"C{i}",
                label=f"{target} {key[:-2]}",
            )
    ax.set_xscale("log", base=2)
    concs = sorted({r["concurrency"] for r in rows})
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("request latency (s)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rss(
    samples: Sequence[tuple[float, int]], verdict: dict[str, Any], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t for t, _ in samples], [b / 2**20 for _, b in samples], color="C0", lw=1.2)
    for key, color in (("baseline_window", "C2"), ("final_window", "C3")):
        if key in verdict:
            lo, hi = verdict[key]
            ax.axvspan(lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("seconds since load start")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
