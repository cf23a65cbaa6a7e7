"""What a decode step costs through a real `vllm serve`: the `openai` engine's decode sessions.

    .venv/bin/python loadtest/remote_session_bench.py [--tokens 32] [--rounds 2] [--block-size N]
        [--skip-fuse]

Starts SmolLM2 behind `python -m vllm.entrypoints.openai.api_server` (float32, as the local
expert), then, per prompt and interleaved, greedy `--tokens` long:

- `vllm greedy`: the server's own streamed answer (`/v1/chat/completions`), the floor;
- `session, 1 token/request`: a view per `/v1/completions` request (`max_tokens: 1`);
- `session, drafted`: drafts of up to 8 greedy tokens per request, every view following them
  (the best case: the expert's own proposal chosen at every step);
- `session, text each step`: lookahead 1 and the chosen piece handed back as text (as when another
  expert's piece wins): a `/tokenize` as well as a `/v1/completions` per step;
- `score 8 tokens (prompt_logprobs)`: one request scoring a chunk of 8 tokens proposed elsewhere
  with `prompt_logprobs` (vLLM computes no cached prefix for such a request), per token;
- `fuse remote + local`: a fuse pool of the vLLM expert and the in-process transformers SmolLM2,
  uniform, ungated and gated at 0.5.

Prints one JSON line per variant: ms per token (or per piece), requests per token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from ensemble.fuse import FusionStrategy
from ensemble.types import (
    ChatMessage,
    EnsembleTrace,
    GenerationRequest,
    SamplingParams,
)
from loadtest import ROOT
from loadtest.servers import start_vllm
from serving.config import OpenAIExpertConfig, TransformersExpertConfig, load_config
from serving.engines.openai.engine import RemoteOpenAIEngine
from serving.engines.openai.http import post_json
from serving.engines.openai.session import RemoteSession
from serving.engines.transformers.engine import TransformersEngine
from serving.models import bundled

MODEL = "smollm2-135m-instruct"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List some facts about the Moon.",
    "What is 12 times 7?",
]


def request(prompt: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        "b", (ChatMessage("user", prompt),), SamplingParams(max_tokens=tokens, temperature=0)
    )


async def vllm_greedy(engine: RemoteOpenAIEngine, req: GenerationRequest) -> tuple[int, float, int]:
    started = time.perf_counter()
    tokens = 0
    async for chunk in engine.generate(req):
        tokens += chunk.tokens
    return tokens, time.perf_counter() - started, 1


async def session_run(
    engine: RemoteOpenAIEngine, req: GenerationRequest, lookahead: int, as_text: bool
) -> tuple[int, float, int]:
    session = await engine.open_session(req)
    assert isinstance(session, RemoteSession)
    session.max_lookahead = lookahead
    before = session.texts.requests
    steps = 0
    started = time.perf_counter()
    for _ in range(req.params.max_tokens or 32):
        top = (await session.top_k(10)).candidates[0]
        steps += 1
        if top.end:
            break
        if as_text:
            await session.extend(top.text)
        else:
            await session.extend_ids(top.token_ids, top.text)
    seconds = time.perf_counter() - started
    requests = session.completions + session.texts.requests - before
    await session.aclose()
    return steps, seconds, requests


async def score_chunk(engine: RemoteOpenAIEngine, req: GenerationRequest) -> tuple[int, float, int]:
    """Score 8 tokens proposed elsewhere in one request, with prompt logprobs (top 10)."""
    session = await engine.open_session(req)
    assert isinstance(session, RemoteSession)
    chunk = await session.texts.tokenize(" The quick brown fox jumps over the lazy dog again")
    chunk = chunk[:8]
    body = {
        "model": engine.config.model,
        "prompt": [*session.prompt_ids, *chunk],
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 10,
    }
    assert engine._client is not None
    started = time.perf_counter()
    url = f"{engine.base_url}/completions"
    await post_json(engine._client, engine.config, engine.name, url, body)
    seconds = time.perf_counter() - started
    await session.aclose()
    return len(chunk), seconds, 1


async def fused(
    engines: list[RemoteOpenAIEngine | TransformersEngine],
    req: GenerationRequest,
    gate: float | None,
) -> tuple[int, float, int]:
    trace = EnsembleTrace()
    started = time.perf_counter()
    pieces = 0
    async for chunk in FusionStrategy(weighting="uniform", gate=gate).run(req, engines, trace):
        pieces += chunk.tokens
    return pieces, time.perf_counter() - started, 0


async def bench(
    url: str, model: str, tokens: int, rounds: int, skip_fuse: bool
) -> dict[str, list[tuple[int, float, int]]]:
    config = OpenAIExpertConfig(engine="openai", base_url=f"{url}/v1", model=model)
    remote = RemoteOpenAIEngine("remote", config)
    local_config = load_config(DEFAULT_CONFIG).experts[MODEL]
    assert isinstance(local_config, TransformersExpertConfig)
    local = TransformersEngine("local", local_config)
    await remote.start()
    await local.start()
    runs: dict[str, list[tuple[int, float, int]]] = defaultdict(list)
    variants: dict[str, Callable[[GenerationRequest], Awaitable[tuple[int, float, int]]]] = {
        "vllm greedy (chat stream)": lambda r: vllm_greedy(remote, r),
        "session, 1 token/request": lambda r: session_run(remote, r, 1, False),
        "session, drafted (up to 8)": lambda r: session_run(remote, r, 8, False),
        "session, text each step": lambda r: session_run(remote, r, 1, True),
        "score 8 tokens (prompt_logprobs)": lambda r: score_chunk(remote, r),
        "fuse remote + local, uniform": lambda r: fused([remote, local], r, None),
        "fuse remote + local, gated 0.5": lambda r: fused([remote, local], r, 0.5),
    }
    if skip_fuse:
        variants = {k: v for k, v in variants.items() if not k.startswith("fuse")}
    for prompt in PROMPTS:  # warm-up: token texts learnt, code paths compiled
        await session_run(remote, request(prompt, tokens), 8, False)
    for _ in range(rounds):
        for prompt in PROMPTS:
            for name, run in variants.items():
                runs[name].append(await run(request(prompt, tokens)))
    await remote.aclose()
    await local.aclose()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-fuse", action="store_true", help="the remote expert alone")
    args = parser.parse_args()
    extra = ("--block-size", str(args.block_size)) if args.block_size else ()
    folder = bundled.resolve(f"bundled:{MODEL}")
    server, url = start_vllm(folder, served_name=MODEL, dtype=args.dtype, extra=extra)
    try:
        ready = server.wait_ready(240)
        print(f"# vLLM ready in {ready:.0f}s (log {server.log_path})", file=sys.stderr)
        runs = asyncio.run(bench(url, MODEL, args.tokens, args.rounds, args.skip_fuse))
    finally:
        server.stop(60)
    for name, results in runs.items():
        steps = sum(r[0] for r in results)
        seconds = sum(r[1] for r in results)
        requests = sum(r[2] for r in results)
        per_run = [1000 * r[1] / max(r[0], 1) for r in results]
        print(
            json.dumps(
                {
                    "variant": name,
                    "block_size": args.block_size or "default (128 on CPU)",
                    "ms_per_token": round(1000 * seconds / steps, 2),
                    "ms_per_token_median_run": round(statistics.median(per_run), 2),
                    "tokens_per_s": round(steps / seconds, 2),
                    "requests_per_token": round(requests / steps, 3),
                    "tokens": steps,
                }
            )
        )


if __name__ == "__main__":
    main()
