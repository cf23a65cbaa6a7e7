"""`chorus calibrate`: run a pool's experts on labeled questions and grade them into the
calibration records a router is fitted on."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ensemble.answers import is_correct
from ensemble.engine import Engine
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from router.files import read_jsonl, write_jsonl
from serving.config import Config
from serving.engines import build_engine


def load_labeled(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, record in read_jsonl(path):
        question, answers = record.get("question"), record.get("answers")
        if not isinstance(question, str) or not isinstance(answers, list) or not answers:
            raise ValueError(f"{path}:{number}: needs a string `question` and a list `answers`")
        records.append(record)
    return records


async def answer(engine: Engine, question: str, max_tokens: int) -> str:
    request = GenerationRequest(
        "calibrate",
        (ChatMessage("user", question),),
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    return "".join([chunk.text async for chunk in engine.generate(request)])


async def calibrate(
    config: Config, pool: str, data: Path, out: Path, *, max_tokens: int = 48
) -> dict[str, dict[str, float]]:
    """Write one calibration record per question; return accuracy per expert and category."""
    questions = load_labeled(data)
    names = list(config.pools[pool].experts)
    engines = {name: build_engine(name, config.experts[name]) for name in names}
    await asyncio.gather(*(engine.start() for engine in engines.values()))
    records = []
    tally: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    try:
        for item in tqdm(questions, desc=f"calibrating {pool}", unit="question"):
            replies = await asyncio.gather(
                *(answer(engines[n], item["question"], max_tokens) for n in names)
            )
            scores = {
                n: float(is_correct(reply, item["answers"]))
                for n, reply in zip(names, replies, strict=True)
            }
            category = item.get("category", "all")
            for n, score in scores.items():
                tally[n][category].append(score)
                tally[n]["all"].append(score)
            records.append({"query": item["question"], "scores": scores, "category": category})
    finally:
        await asyncio.gather(*(engine.aclose() for engine in engines.values()))
    write_jsonl(out, records)
    return {
        name: {cat: round(sum(s) / len(s), 4) for cat, s in sorted(cats.items())}
        for name, cats in tally.items()
    }


def print_summary(summary: dict[str, dict[str, float]]) -> None:
    for name, accuracy in summary.items():
        print(json.dumps({"expert": name, "accuracy": accuracy}))
