"""The transformers engine on the real bundled models: decoding must match transformers itself."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from ensemble.errors import PromptTooLong
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.engines.common.entropy import ENTROPY_TOP, estimated_entropy
from serving.engines.transformers.engine import TransformersEngine
from tests.conftest import collect, request, texts

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"


def reference_greedy(engine: TransformersEngine, req: GenerationRequest, max_new: int) -> str:
    """What transformers' own `generate` produces for the same prompt ids."""
    ids = engine.encode_prompt(req)
    model, tok = engine._model, engine._tokenizer
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
    text: str = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    return text


@pytest.mark.parametrize(
    "prompt", [QUESTION, "Write a haiku about the sea.", "List three colours."]
)
def test_greedy_matches_transformers_generate(smollm2: TransformersEngine, prompt: str) -> None:
    req = request(prompt, max_tokens=24, temperature=0.0)
    chunks = collect(smollm2, req)
    assert texts(chunks)[0] == reference_greedy(smollm2, req, 24)


def test_gemma_plain_template_matches_generate_and_stops_before_next_turn(
    gemma: TransformersEngine,
) -> None:
    req = request(QUESTION, max_tokens=40, temperature=0.0)
    out = texts(collect(gemma, req))[0]
    reference = reference_greedy(gemma, req, 40)
    assert "\nUser:" not in out
    assert reference.startswith(out)
    assert out.strip()


def test_n_greedy_samples_equal_the_single_greedy_answer(smollm2: TransformersEngine) -> None:
    one = texts(collect(smollm2, request(QUESTION, max_tokens=16, temperature=0.0)))[0]
    three = texts(collect(smollm2, request(QUESTION, max_tokens=16, temperature=0.0, n=3)))
    assert three == {0: one, 1: one, 2: one}


def test_seed_makes_sampling_reproducible(smollm2: TransformersEngine) -> None:
    params = {"max_tokens": 16, "temperature": 1.0, "n": 4}
    a = texts(collect(smollm2, request("Tell me a story.", seed=11, **params)))
    b = texts(collect(smollm2, request("Tell me a story.", seed=11, **params)))
    c = texts(collect(smollm2, request("Tell me a story.", seed=12, **params)))
    assert a == b
    assert a != c
    assert len(set(a.values())) > 1  # the four samples differ from each other


def test_samples_finish_independently(smollm2: TransformersEngine) -> None:
    chunks = collect(smollm2, request(QUESTION, max_tokens=12, temperature=1.2, n=6, seed=3))
    finishes = {c.index: c.finish_reason for c in chunks if c.finish_reason}
    counts: dict[int, int] = {}
    for c in chunks:
        counts[c.index] = counts.get(c.index, 0) + c.tokens
    assert set(finishes) == set(range(6))
    assert all(counts[i] <= 12 for i in counts)
    assert all((counts[i] == 12) == (finishes[i] == "length") for i in counts)


def test_stop_string_ends_the_answer(smollm2: TransformersEngine) -> None:
    chunks = collect(smollm2, request(QUESTION, max_tokens=30, temperature=0.0, stop=("Paris",)))
    assert texts(chunks)[0] == "The capital of France is "
    assert chunks[-1].finish_reason == "stop"


def test_max_tokens_one_gives_length(smollm2: TransformersEngine) -> None:
    chunks = collect(smollm2, request(QUESTION, max_tokens=1, temperature=0.0))
    assert sum(c.tokens for c in chunks) == 1
    assert chunks[-1].finish_reason == "length"


def test_logprobs_cover_every_token_and_greedy_picks_the_top(smollm2: TransformersEngine) -> None:
    req = request(QUESTION, max_tokens=10, temperature=0.0, logprobs=True, top_logprobs=3)
    chunks = collect(smollm2, req)
    entries = [lp for c in chunks for lp in c.logprobs]
    assert len(entries) == sum(c.tokens for c in chunks)
    for entry in entries:
        assert len(entry.top) == 3
        assert entry.top[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top[0].logprob)
        assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob
        assert entry.logprob <= 0


def test_prompt_longer_than_the_context_window_is_refused(smollm2: TransformersEngine) -> None:
    with pytest.raises(PromptTooLong, match="maximum context length is 8192"):
        collect(smollm2, request("word " * 9000, max_tokens=4))
    with pytest.raises(PromptTooLong):
        collect(smollm2, request(QUESTION, max_tokens=9000))


def test_concurrent_requests_interleave_without_mixing(smollm2: TransformersEngine) -> None:
    prompts = [QUESTION, "Name a fruit.", "What is 2 + 2?"]
    alone = [
        texts(collect(smollm2, request(p, max_tokens=12, temperature=0.0)))[0] for p in prompts
    ]

    async def together() -> list[str]:
        async def one(p: str) -> str:
            req = request(p, max_tokens=12, temperature=0.0)
            return "".join([c.text async for c in smollm2.generate(req)])

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    assert asyncio.run(together()) == alone


def test_closing_a_stream_early_frees_the_engine(smollm2: TransformersEngine) -> None:
    async def read_two_then_close() -> int:
        req = GenerationRequest(
            "t", (ChatMessage("user", "Count to one hundred."),), SamplingParams(max_tokens=200)
        )
        stream = smollm2.generate(req)
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return len(got)

    assert asyncio.run(read_two_then_close()) == 2
    # The worker is free for the next request straight away.
    assert texts(collect(smollm2, request(QUESTION, max_tokens=3, temperature=0.0)))[0]


def test_session_entropy_is_the_estimate_every_engine_gives(smollm2: TransformersEngine) -> None:
    """The session has the whole distribution, yet reports the top-20 estimate that vLLM's
    sessions give (one cascade threshold, one meaning), a lower bound on the exact entropy."""

    async def go() -> None:
        session = await smollm2.open_session(request("List three colours.", max_tokens=8))
        try:
            for _ in range(4):
                view = await session.top_k(10, full=True)
                logp = np.asarray(view.distribution, dtype=np.float64)
                exact = float(-(np.exp(logp) * logp).sum())
                top20 = np.sort(logp)[-ENTROPY_TOP:].tolist()
                assert view.entropy == pytest.approx(estimated_entropy(top20), abs=1e-6)
                assert 0 <= view.entropy <= exact + 1e-4
                top = view.candidates[0]
                await session.extend_ids(top.token_ids, top.text)
        finally:
            await session.aclose()

    asyncio.run(go())
