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
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from router.files import write_jsonl
from serving.config import Config
from serving.evaluation.calibrate import TOP_LOGPROBS, wants_logprobs
from serving.evaluation.graders import grade

# What a vote pool votes over, per grader: letters, numbers, short answers, or whole replies.
VOTE_FORMATS = {"choice": "choice", "number": "number", "short": "short", "code": "text"}


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
    client: httpx.AsyncClient,
    model: str,
    record: dict[str, Any],
    *,
    max_tokens: int,
    logprobs: bool,
    voting: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": record["question"]}],
        "max_tokens": int(record.get("max_tokens", max_tokens)),
    }
    if voting:  # at the pool's temperature, over the answers this record's grader reads
        body["answer_format"] = VOTE_FORMATS.get(record.get("grader", "auto"), "auto")
    else:
        body["temperature"] = 0
    if logprobs:
        body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return {"error": response.text[:300], "latency_s": latency, "completion_tokens": 0}
    data = response.json()
    choice = data["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    return {
        "reply": choice["message"]["content"],
        "latency_s": latency,
        "prompt_tokens": data["usage"]["prompt_tokens"],
        "completion_tokens": data["usage"]["completion_tokens"],
        "experts": data.get("chorus", {}).get("experts", []),
        "first_token_logprobs": content[0]["top_logprobs"] if content else [],
    }


async def _strategies(client: httpx.AsyncClient) -> dict[str, str]:
    """Each model id's strategy ("expert" for a single expert), from /v1/models."""
    cards = (await client.get("/v1/models")).json()["data"]
    return {c["id"]: c.get("chorus", {}).get("strategy", "expert") for c in cards}


async def run_eval(
    url: str,
    models: Sequence[str],
    questions: Sequence[dict[str, Any]],
    *,
    max_tokens: int,
    concurrency: int = 1,
    skip: Collection[tuple[str, str]] = (),
    progress: Path | None = None,
) -> list[dict[str, Any]]:
    """Every model's graded answer to every question, `concurrency` questions at a time (the
    models of one question one after another). `skip` holds (model, category) pairs not run.
    With `progress`, each result is appended there as it comes."""

    def asked(item: dict[str, Any]) -> list[str]:
        return [m for m in models if (m, item.get("category", "all")) not in skip]

    results: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(concurrency)
    sink = progress.open("w", encoding="utf-8") if progress else None
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        strategies = await _strategies(client)

        async def one(item: dict[str, Any], bar: tqdm[Any]) -> None:
            async with gate:
                for model in asked(item):
                    # A vote samples at its pool's temperature, and its answer is the voted
                    # reply (logprobs would be one sample's); everything else is greedy.
                    voting = strategies.get(model) == "vote"
                    answer = await ask(
                        client,
                        model,
                        item,
                        max_tokens=max_tokens,
                        logprobs=wants_logprobs(item) and not voting,
                        voting=voting,
                    )
                    graded = await asyncio.to_thread(
                        grade, item, answer.get("reply", ""), answer.get("first_token_logprobs")
                    )
                    result = {
                        "model": model,
                        "category": item.get("category", "all"),
                        "id": item.get("id", item["question"][:80]),
                        "question": item["question"],
                        "answers": item["answers"][:10],
                        "correct": "error" not in answer and graded.correct,
                        "read": graded.answer,
                        "generated_correct": graded.generated_correct,
                        **answer,
                    }
                    results.append(result)
                    if sink is not None:
                        sink.write(json.dumps(result) + "\n")
                        sink.flush()
                    bar.update(1)

        try:
            with tqdm(
                total=sum(len(asked(q)) for q in questions), desc="evaluating", unit="answer"
            ) as bar:
                await asyncio.gather(*(one(item, bar) for item in questions))
        finally:
            if sink is not None:
                sink.close()
    return results


def expert_records(
    results: Sequence[dict[str, Any]], experts: Sequence[str]
) -> list[dict[str, Any]]:
    """The experts' answers as calibration records (query, scores, tokens, seconds) of the
    questions every one of them answered: held-out records for `chorus router curve`."""
    by_question: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in results:
        if r["model"] in experts and "error" not in r:
            by_question[(r["category"], r["id"])][r["model"]] = r
    records = []
    for (category, _), rows in by_question.items():
        if len(rows) < len(experts):
            continue
        first = next(iter(rows.values()))
        records.append(
            {
                "query": first["question"],
                "category": category,
                "scores": {e: float(rows[e]["correct"]) for e in experts},
                "tokens": {
                    e: {
                        "prompt": rows[e]["prompt_tokens"],
                        "completion": rows[e]["completion_tokens"],
                    }
                    for e in experts
                },
                "seconds": {e: round(rows[e]["latency_s"], 4) for e in experts},
            }
        )
    return records


def _mean(values: Iterable[float]) -> float:
    listed = list(values)
    return statistics.mean(listed) if listed else 0.0


def _stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    graded_letters = [
        r["generated_correct"] for r in rows if r.get("generated_correct") is not None
    ]
    return {
        "accuracy": _mean(r["correct"] for r in rows),
        "answers": len(rows),
        "generated_letter_accuracy": _mean(graded_letters) if graded_letters else None,
        "mean_latency_s": _mean(r["latency_s"] for r in rows),
        "mean_completion_tokens": _mean(r["completion_tokens"] for r in rows),
        # What a question cost: every token the pool spent on it (a vote's losing samples and
        # every fused expert's prompt included), prompt and completion.
        "mean_tokens": _mean(r.get("prompt_tokens", 0) + r["completion_tokens"] for r in rows),
        "errors": sum("error" in r for r in rows),
    }


def summarize(
    results: Sequence[dict[str, Any]], models: Sequence[str], experts: Collection[str] = ()
) -> dict[str, Any]:
    """Per model: overall and per-category statistics; the oracle of the experts (a question
    counts when any expert got it right, over questions every expert answered); and, for pools,
    which expert answered (the first routed) per category."""
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_model[r["model"]].append(r)
    categories = sorted({r["category"] for r in results})
    summary: dict[str, Any] = {"categories": categories, "models": {}}
    for model in models:
        rows = by_model[model]
        summary["models"][model] = _stats(rows) | {
            "per_category": {
                c: _stats(sub)
                for c in categories
                if (sub := [r for r in rows if r["category"] == c])
            }
        }
        if model not in experts:
            split: dict[str, Counter[str]] = defaultdict(Counter)
            for r in rows:
                if r.get("experts"):
                    split[r["category"]][r["experts"][0]] += 1
            summary["models"][model]["routed"] = {c: dict(n) for c, n in sorted(split.items())}
    expert_ids = [m for m in models if m in experts]
    if len(expert_ids) > 1:
        summary["oracle"] = _oracle(results, expert_ids, categories)
    return summary


def _oracle(
    results: Sequence[dict[str, Any]], experts: Sequence[str], categories: Sequence[str]
) -> dict[str, Any]:
    right: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for r in results:
        if r["model"] in experts:
            right[(r["category"], r["id"])][r["model"]] = bool(r["correct"])
    complete = {k: v for k, v in right.items() if len(v) == len(experts)}
    per_category = {
        c: _mean(any(v.values()) for (cat, _), v in complete.items() if cat == c)
        for c in categories
    }
    return {
        "experts": list(experts),
        "accuracy": _mean(any(v.values()) for v in complete.values()),
        "answers": len(complete),
        "per_category": per_category,
    }


def _accuracy(stats: dict[str, Any], category: str | None) -> float | None:
    if category is None:
        return float(stats["accuracy"])
    cell = stats["per_category"].get(category)
    return None if cell is None else float(cell["accuracy"] if isinstance(cell, dict) else cell)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Accuracy per category and overall, one bar per model (and the experts' oracle, hatched);
    a model not run on a category has no bar there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = dict(summary["models"])
    if "oracle" in summary:
        rows["oracle of the experts"] = summary["oracle"]
    groups: list[str | None] = [*summary["categories"], None]
    x = np.arange(len(groups))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups) + 2), 4.8))
    for i, (name, stats) in enumerate(rows.items()):
        values = [_accuracy(stats, g) for g in groups]
        offsets = x + (i - (len(rows) - 1) / 2) * width
        kept = [(o, v) for o, v in zip(offsets, values, strict=True) if v is not None]
        hatch = "//" if name == "oracle of the experts" else None
        ax.bar(
            [o for o, _ in kept],
            [v for _, v in kept],
            width,
            label=name,
            hatch=hatch,
            fill=hatch is None,
        )
    ax.set_xticks(x, [g or "overall" for g in groups], rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per benchmark (chorus eval)")
    ax.legend(fontsize=8, ncol=min(len(rows), 4), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(stats: dict[str, Any] | None, key: str, fmt: str) -> str:
    return "not run" if stats is None else format(stats[key], fmt)


def write_report(
    out: Path,
    results: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    command: str,
    experts: Sequence[str] = (),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "results.jsonl", list(results))
    if experts:
        write_jsonl(out / "records.jsonl", expert_records(results, experts))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "accuracy.png")
    models, categories = list(summary["models"]), summary["categories"]
    lines = [
        "# Chorus evaluation",
        "",
        f"Command: `{command}`",
        "",
        "Tokens per question: prompt and completion tokens of every expert the model used on it "
        "(a vote's every sample, a fusion's every expert).",
        "",
        "| model | accuracy | answers | latency (s) | completion tokens | tokens per question "
        "| errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        s = summary["models"][model]
        lines.append(
            f"| {model} | {s['accuracy']:.3f} | {s['answers']} | {s['mean_latency_s']:.2f} | "
            f"{s['mean_completion_tokens']:.1f} | {s['mean_tokens']:.0f} | {s['errors']} |"
        )
    if "oracle" in summary:
        o = summary["oracle"]
        lines.append(
            f"| oracle of {', '.join(o['experts'])} | {o['accuracy']:.3f} | {o['answers']} "
            "| | | | |"
        )
    header = (
        "| benchmark | " + " | ".join(models) + (" | oracle |" if "oracle" in summary else " |")
    )
    for title, key, fmt in (
        ("Accuracy per benchmark", "accuracy", ".3f"),
        ("Mean latency per question (s)", "mean_latency_s", ".2f"),
        ("Tokens per question", "mean_tokens", ".0f"),
    ):
        lines += ["", f"{title}:", "", header, "|---|" + "---|" * (len(header.split("|")) - 3)]
        for c in categories:
            cells = [_cell(summary["models"][m]["per_category"].get(c), key, fmt) for m in models]
            if "oracle" in summary:
                cells.append(
                    format(summary["oracle"]["per_category"][c], fmt) if key == "accuracy" else ""
                )
            n = max(
                (summary["models"][m]["per_category"].get(c) or {}).get("answers", 0)
                for m in models
            )
            lines.append(f"| {c} ({n}) | " + " | ".join(cells) + " |")
    letters = [
        (c, m, cell["generated_letter_accuracy"])
        for c in categories
        for m in models
        if (cell := summary["models"][m]["per_category"].get(c))
        and cell["generated_letter_accuracy"] is not None
    ]
    if letters:
        lines += ["", "Multiple choice by the generated letter instead of log-probabilities:", ""]
        lines += [f"- {c}, {m}: {acc:.3f}" for c, m, acc in letters]
    routed = {m: s["routed"] for m, s in summary["models"].items() if s.get("routed")}
    if routed:
        lines += ["", "Which expert answered (a pool's first expert), per benchmark:", ""]
        for model, split in routed.items():
            for c, counts in split.items():
                shares = ", ".join(f"{e} {n}" for e, n in sorted(counts.items()))
                lines.append(f"- {model}, {c}: {shares}")
    lines += ["", "![accuracy per benchmark](accuracy.png)", ""]
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
