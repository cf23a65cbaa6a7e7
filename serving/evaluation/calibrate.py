"""`chorus calibrate`: run a pool's experts on labeled questions and grade them into the
calibration records a router is fitted on.

A record: the query, each expert's score, and what its answer cost (prompt and completion
tokens, seconds on this machine), so routers can weigh quality against cost. Questions run a few
at a time (`concurrency`): the engines batch concurrent requests, and all experts answer each
question side by side.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ensemble.engine import Engine
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from router.files import read_jsonl, write_jsonl
from serving.config import Config
from serving.engines import build_engine
from serving.evaluation.graders import grade

# How many of the first token's alternatives a letter is read from (the API's maximum).
TOP_LOGPROBS = 20


def load_labeled(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, record in read_jsonl(path):
        question, answers = record.get("question"), record.get("answers")
        if not isinstance(question, str) or not isinstance(answers, list):
            raise ValueError(f"{path}:{number}: needs a string `question` and a list `answers`")
        if not answers and record.get("grader") != "code":
            raise ValueError(f"{path}:{number}: `answers` is empty")
        records.append(record)
    return records


def wants_logprobs(record: Mapping[str, Any]) -> bool:
    return record.get("grader") == "choice"


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    first_token_logprobs: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    seconds: float


async def answer(engine: Engine, record: Mapping[str, Any], max_tokens: int) -> Answer:
    logprobs = wants_logprobs(record)
    request = GenerationRequest(
        "calibrate",
        (ChatMessage("user", record["question"]),),
        SamplingParams(
            max_tokens=int(record.get("max_tokens", max_tokens)),
            temperature=0.0,
            logprobs=logprobs,
            top_logprobs=TOP_LOGPROBS if logprobs else 0,
        ),
    )
    started = time.perf_counter()
    texts: list[str] = []
    first: list[dict[str, Any]] = []
    prompt = completion = 0
    async for chunk in engine.generate(request):
        texts.append(chunk.text)
        completion += chunk.tokens
        prompt = chunk.prompt_tokens or prompt
        if chunk.logprobs and not first:
            first = [{"token": t.token, "logprob": t.logprob} for t in chunk.logprobs[0].top]
    return Answer("".join(texts), first, prompt, completion, time.perf_counter() - started)


async def calibrate(
    config: Config,
    pool: str,
    data: Path,
    out: Path,
    *,
    max_tokens: int = 48,
    concurrency: int = 4,
) -> dict[str, dict[str, float]]:
    """Write one calibration record per question; return accuracy per expert and category."""
    questions = load_labeled(data)
    names = list(config.pools[pool].experts)
    engines = {name: build_engine(name, config.experts[name]) for name in names}
    await asyncio.gather(*(engine.start() for engine in engines.values()))
    records: list[dict[str, Any] | None] = [None] * len(questions)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, bar: tqdm[Any]) -> None:
        item = questions[i]
        async with gate:
            replies = await asyncio.gather(*(answer(engines[n], item, max_tokens) for n in names))
            # Grading may execute code: off the event loop, so the engines keep decoding.
            grades = await asyncio.gather(
                *(asyncio.to_thread(grade, item, r.text, r.first_token_logprobs) for r in replies)
            )
        record = records[i] = {
            "query": item["question"],
            "category": item.get("category", "all"),
            "scores": {n: float(g.correct) for n, g in zip(names, grades, strict=True)},
            "tokens": {
                n: {"prompt": r.prompt_tokens, "completion": r.completion_tokens}
                for n, r in zip(names, replies, strict=True)
            },
            "seconds": {n: round(r.seconds, 4) for n, r in zip(names, replies, strict=True)},
        }
        progress.write(json.dumps(record) + "\n")
        progress.flush()
        bar.update(1)

    # Records are kept as they come in `<out>.partial` (a long run shows its progress and loses
    # nothing done); `out` is written, in question order, when every question is answered.
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (
            partial.open("w", encoding="utf-8") as progress,
            tqdm(total=len(questions), desc=f"calibrating {pool}", unit="question") as bar,
        ):
            await asyncio.gather(*(one(i, bar) for i in range(len(questions))))
    finally:
        await asyncio.gather(*(engine.aclose() for engine in engines.values()))
    done = [r for r in records if r is not None]
    write_jsonl(out, done)
    partial.unlink()
    return summarize_records(done)


def summarize_records(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    tally: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name, score in record["scores"].items():
            tally[name][record["category"]].append(score)
            tally[name]["all"].append(score)
    return {
        name: {cat: round(sum(s) / len(s), 4) for cat, s in sorted(cats.items())}
        for name, cats in tally.items()
    }


def print_summary(summary: dict[str, dict[str, float]]) -> None:
    for name, accuracy in summary.items():
        print(json.dumps({"expert": name, "accuracy": accuracy}))
