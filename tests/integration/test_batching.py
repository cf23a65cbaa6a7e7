"""The transformers engine batches concurrent requests: one forward per step over all of them.

A request must decode exactly as it does alone while others join, run beside it and leave; a
request that is closed early must leave the batch at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ensemble.types import GenerationRequest
from serving.engines.transformers.engine import TransformersEngine
from tests.conftest import collect, texts
from tests.conftest import request as ask

pytestmark = pytest.mark.integration

# Different lengths, so the batch is left-padded, and requests join a running batch.
PROMPTS = [
    "What is the capital of France?",
    "Name a fruit.",
    "Write a haiku about the sea, and then explain what each of its three lines means.",
    "What is 2 + 2?",
]


async def _text(engine: TransformersEngine, req: GenerationRequest, delay: float = 0.0) -> Any:
    await asyncio.sleep(delay)
    return texts([c async for c in engine.generate(req)])


def together(engine: TransformersEngine, reqs: list[GenerationRequest]) -> list[Any]:
    """Run `reqs` at once, each starting a little after the one before (so they join mid-way)."""

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(_text(engine, r, 0.15 * i) for i, r in enumerate(reqs))))

    return asyncio.run(run())


def peak_rows(engine: TransformersEngine, reqs: list[GenerationRequest]) -> tuple[list[Any], int]:
    """`together`, also reporting the most rows the engine's batch held at once."""
    peak = 0
    scheduler = engine._scheduler

    async def watch(done: asyncio.Event) -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, scheduler.batch.rows)
            await asyncio.sleep(0.005)

    async def run() -> list[Any]:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        out = await asyncio.gather(*(_text(engine, r, 0.15 * i) for i, r in enumerate(reqs)))
        done.set()
        await watcher
        return list(out)

    return asyncio.run(run()), peak


@pytest.mark.parametrize("engine_name", ["smollm2", "gemma"])
def test_greedy_answers_do_not_change_when_requests_share_the_batch(
    engine_name: str, request: pytest.FixtureRequest
) -> None:
    engine: TransformersEngine = request.getfixturevalue(engine_name)
    reqs = [ask(p, max_tokens=8 + 4 * i, temperature=0.0) for i, p in enumerate(PROMPTS)]
    alone = [texts(collect(engine, r)) for r in reqs]
    shared, peak = peak_rows(engine, reqs)
    assert shared == alone
    assert peak >= 3  # they really ran in one batch
    assert engine._scheduler.batch.rows == 0 and not engine._scheduler.owners


def test_gemma_beyond_its_sliding_window_beside_short_requests(gemma: TransformersEngine) -> None:
    # Gemma 3's local layers keep 512 positions: this prompt outgrows them, the others do not.
    long_prompt = "Here is a list of words: " + ", ".join(["apple", "river", "stone"] * 200)
    reqs = [
        ask(long_prompt + "\nWhich three words are in the list?", max_tokens=8, temperature=0),
        ask(PROMPTS[0], max_tokens=12, temperature=0.0),
        ask(PROMPTS[1], max_tokens=10, temperature=0.0),
    ]
    assert len(gemma.encode_prompt(reqs[0])) > 600
    alone = [texts(collect(gemma, r)) for r in reqs]
    assert together(gemma, reqs) == alone
    assert together(gemma, reqs[::-1]) == alone[::-1]


def test_n_and_seeds_reproduce_under_concurrency(smollm2: TransformersEngine) -> None:
    sampled = ask("Tell me a story.", max_tokens=12, temperature=1.0, n=3, seed=7)
    logprobs = ask(PROMPTS[0], max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=2)
    alone = [collect(smollm2, sampled), collect(smollm2, logprobs)]
    reqs = [
        ask(PROMPTS[2], max_tokens=16, temperature=0.0),
        sampled,
        ask(PROMPTS[1], max_tokens=14, temperature=0.7, top_p=0.9, n=2, seed=1),
        logprobs,
    ]
    shared = together(smollm2, reqs)
    assert shared[1] == texts(alone[0])
    assert len(set(shared[1].values())) > 1  # the samples still differ from each other
    assert shared[3] == texts(alone[1])
    assert set(shared[2]) == {0, 1}


def test_a_closed_stream_leaves_the_batch_while_the_others_finish(
    smollm2: TransformersEngine,
) -> None:
    scheduler = smollm2._scheduler
    reqs = [ask(p, max_tokens=20, temperature=0.0) for p in PROMPTS[:3]]
    alone = [texts(collect(smollm2, r)) for r in reqs]
    quitter = ask("Count to one hundred.", max_tokens=200, temperature=0.0, n=2)

    async def run() -> tuple[list[Any], int, bool]:
        others = [asyncio.create_task(_text(smollm2, r)) for r in reqs]
        stream = smollm2.generate(quitter)
        await anext(stream)
        await anext(stream)
        rows_before = scheduler.batch.rows
        await stream.aclose()
        # The closed request's rows leave at the next step, long before the others finish.
        while any(run.stream.cancelled for run in scheduler.owners):
            await asyncio.sleep(0.005)
        others_running = not all(t.done() for t in others)
        return list(await asyncio.gather(*others)), rows_before, others_running

    shared, rows_before, others_running = asyncio.run(run())
    assert rows_before == 5  # three requests and the two samples of the one that left
    assert others_running
    assert shared == alone
    deadline = time.monotonic() + 5  # the last rows leave just after their final chunk is posted
    while scheduler.batch.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.batch.rows == 0 and not scheduler.owners
