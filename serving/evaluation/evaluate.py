"""`chorus eval`: is a pool better than its best expert? Accuracy, latency and tokens, with a chart.

Questions go through the real HTTP API, either of a running server (`--url`) or of the config
served in this process on a free loopback port, so what is measured is what clients get. Models
are interleaved question by question, so machine noise falls on all of them alike.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from ensemble.answers import is_correct
from router.files import write_jsonl
from serving.config import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serve_in_process(config: Config) -> AsyncIterator[str]:
    """The app on a free loopback port in this event loop; yields its base URL once healthy."""
    import uvicorn

    from serving.http.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            while True:
                if task.done():
                    task.result()
                    raise RuntimeError("the server stopped while starting")
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        await task


async def ask(
    client: httpx.AsyncClient, model: str, question: str, max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,  # greedy for single experts; a vote pool samples at its own setting
    }
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return {"error": response.text[:300], "latency_s": latency, "completion_tokens": 0}
    data = response.json()
    return {
        "reply": data["choices"][0]["message"]["content"],
        "latency_s": latency,
        "completion_tokens": data["usage"]["completion_tokens"],
        "experts": data.get("chorus", {}).get("experts", []),
    }


async def run_eval(
    url: str, models: Sequence[str], questions: Sequence[dict[str, Any]], *, max_tokens: int
) -> list[dict[str, Any]]:
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        with tqdm(total=len(questions) * len(models), desc="evaluating", unit="answer") as bar:
            for item in questions:
                for model in models:
                    answer = await ask(client, model, item["question"], max_tokens)
                    reply = answer.get("reply", "")
                    results.append(
                        {
                            "model": model,
                            "category": item.get("category", "all"),
                            "question": item["question"],
                            "answers": item["answers"],
                            "correct": bool(reply) and is_correct(reply, item["answers"]),
                            **answer,
                        }
                    )
                    bar.update(1)
    return results


def summarize(results: Sequence[dict[str, Any]], models: Sequence[str]) -> dict[str, Any]:
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_model[r["model"]].append(r)
    categories = sorted({r["category"] for r in results})
    summary: dict[str, Any] = {"categories": categories, "models": {}}
    for model in models:
        rows = by_model[model]
        per_category = {
            c: statistics.mean(r["correct"] for r in rows if r["category"] == c)
            for c in categories
            if any(r["category"] == c for r in rows)
        }
        summary["models"][model] = {
            "accuracy": statistics.mean(r["correct"] for r in rows) if rows else 0.0,
            "per_category": per_category,
            "mean_latency_s": statistics.mean(r["latency_s"] for r in rows) if rows else 0.0,
            "mean_completion_tokens": (
                statistics.mean(r["completion_tokens"] for r in rows) if rows else 0.0
            ),
            "errors": sum("error" in r for r in rows),
            "answers": len(rows),
        }
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(summary["models"])
    groups = [*summary["categories"], "overall"]
    x = np.arange(len(groups))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups) + 2), 4.5))
    for i, model in enumerate(models):
        stats = summary["models"][model]
        values = [stats["per_category"].get(g, 0.0) for g in groups[:-1]] + [stats["accuracy"]]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per category (chorus eval)")
    ax.legend(fontsize=8, ncol=min(len(models), 4), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path, results: Sequence[dict[str, Any]], summary: dict[str, Any], command: str
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", list(results))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "accuracy.png")
    models, categories = list(summary["models"]), summary["categories"]
    lines = [
        "# Chorus evaluation",
        "",
        f"Command: `{command}`",
        "",
        "| model | accuracy | mean latency (s) | completion tokens per answer | errors |",
        "|---|---|---|---|---|",
    ]
    for model in models:
        s = summary["models"][model]
        lines.append(
            f"| {model} | {s['accuracy']:.3f} ({s['answers']} answers) | "
            f"{s['mean_latency_s']:.2f} | {s['mean_completion_tokens']:.1f} | {s['errors']} |"
        )
    lines += ["", "Accuracy per category:", "", "| category | " + " | ".join(models) + " |"]
    lines.append("|---|" + "---|" * len(models))
    for category in categories:
        cells = [f"{summary['models'][m]['per_category'].get(category, 0.0):.2f}" for m in models]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy per category](accuracy.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def limit_per_category(questions: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is None:
        return questions
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for q in questions:
        category = q.get("category", "all")
        if seen[category] < limit:
            seen[category] += 1
            kept.append(q)
    return kept
