"""Decode sessions of the `openai` engine against a real `vllm serve` (SmolLM2, float32)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest

from ensemble.types import ChatMessage, GenerationRequest, NextTokens, SamplingParams
from serving.config import OpenAIExpertConfig, load_config
from serving.engines.openai.engine import RemoteOpenAIEngine
from serving.engines.openai.http import post_json
from serving.engines.openai.session import RemoteSession
from serving.engines.transformers.engine import TransformersEngine
from tests.conftest import DEFAULT_CONFIG, ServerProcess, VllmServer

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

PROMPTS = ["What is 8 times 5?", "Écris une phrase en français. 日本語も少し。", "Say only: yes"]
QUESTION = [{"role": "user", "content": "What is the capital of Peru?"}]


def request(prompt: str, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        "t", (ChatMessage("user", prompt),), SamplingParams(max_tokens=max_tokens, temperature=0)
    )


def expert_config(server: VllmServer, **extra: object) -> OpenAIExpertConfig:
    return OpenAIExpertConfig(
        engine="openai",
        base_url=f"{server.url}/v1",
        model=server.model,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def remote(
    vllm_server: VllmServer, loop: asyncio.AbstractEventLoop
) -> Iterator[RemoteOpenAIEngine]:
    engine = RemoteOpenAIEngine("remote", expert_config(vllm_server))
    loop.run_until_complete(engine.start())
    yield engine
    loop.run_until_complete(engine.aclose())


async def follow_greedily(session: RemoteSession, steps: int) -> tuple[str, bool, int]:
    """The session's top candidate, step after step, fed back as its own tokens: the text, whether
    it ended, and the views asked."""
    text = ""
    for step in range(steps):
        top = (await session.top_k(10)).candidates[0]
        if top.end:
            return text, True, step + 1
        text += top.text
        await session.extend_ids(top.token_ids, top.text)
    return text, False, steps


@pytest.mark.parametrize("lookahead", [1, 8])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_top_candidates_followed_greedily_are_vllms_own_greedy_answer(
    remote: RemoteOpenAIEngine, loop: asyncio.AbstractEventLoop, prompt: str, lookahead: int
) -> None:
    req = request(prompt)

    async def go() -> None:
        chunks = [c async for c in remote.generate(req)]
        own = "".join(c.text for c in chunks)
        finish = next(c.finish_reason for c in chunks if c.finish_reason)
        session = await remote.open_session(req)
        assert isinstance(session, RemoteSession)
        session.max_lookahead = lookahead
        followed, ended, steps = await follow_greedily(session, 16)
        assert followed == own
        assert ended == (finish == "stop")
        assert session.prompt_tokens == next(c.prompt_tokens for c in chunks if c.prompt_tokens)
        if lookahead == 1:
            assert session.completions >= steps
        else:  # drafts of 1, 2, 4, 8 tokens: a request per draft, not per token
            assert session.completions <= 5
        await session.aclose()

    loop.run_until_complete(go())


def test_text_chosen_elsewhere_is_continued_as_vllm_would(
    remote: RemoteOpenAIEngine, loop: asyncio.AbstractEventLoop
) -> None:
    req = request("What is the capital of France?")

    async def go() -> None:
        session = await remote.open_session(req)
        assert isinstance(session, RemoteSession)
        await session.extend("The capital of Fr")
        await session.extend("ance is")  # a merge across the join: "Fr" + "ance"
        continued, _, _ = await follow_greedily(session, 6)
        # vLLM's own greedy continuation of the same prompt + text, tokenized in one piece
        texts = session.texts
        ids = [*session.prompt_ids, *await texts.tokenize("The capital of France is")]
        body = {"model": remote.config.model, "prompt": ids, "max_tokens": 6, "temperature": 0}
        assert remote._client is not None
        url = f"{remote.base_url}/completions"
        answer = await post_json(remote._client, remote.config, remote.name, url, body)
        assert continued == answer["choices"][0]["text"]
        assert continued.startswith(" Paris")
        await session.aclose()

    loop.run_until_complete(go())


def test_candidates_are_renormalised_sorted_and_the_entropy_a_lower_bound(
    remote: RemoteOpenAIEngine, loop: asyncio.AbstractEventLoop
) -> None:
    local = TransformersEngine(
        "local", load_config(DEFAULT_CONFIG).experts["smollm2-135m-instruct"]
    )
    req = request("List three colours.")

    async def go() -> None:
        await local.start()
        far, near = await remote.open_session(req), await local.open_session(req)
        try:
            for _ in range(6):
                view: NextTokens = await far.top_k(10, full=True)
                in_process = await near.top_k(10, full=True)
                logp = in_process.distribution.astype("float64")
                true_entropy = float(-(np.exp(logp) * logp).sum())
                probs = [math.exp(c.logprob) for c in view.candidates]
                assert sum(probs) == pytest.approx(1.0)
                assert probs == sorted(probs, reverse=True)
                assert 0 < len(view.candidates) <= 10
                assert view.distribution is None  # no whole distribution remotely
                assert view.candidates[0].text == in_process.candidates[0].text
                assert 0 < view.entropy <= in_process.entropy + 0.02
                assert view.entropy <= true_entropy + 0.02  # a lower bound on the true entropy
                # one estimator: the same figure in process and behind `vllm serve`
                assert view.entropy == pytest.approx(in_process.entropy, abs=0.02)
                top = view.candidates[0]
                await far.extend_ids(top.token_ids, top.text)
                await near.extend(top.text)
        finally:
            await far.aclose()
            await near.aclose()
            await local.aclose()

    loop.run_until_complete(go())


def fuse_config(tmp_path: Path, server: VllmServer) -> Path:
    path = tmp_path / "remote-fuse.yaml"
    path.write_text(
        "experts:\n"
        "  remote-smollm2:\n"
        "    engine: openai\n"
        f"    base_url: {server.url}/v1\n"
        f"    model: {server.model}\n"
        "  smollm2-135m-instruct:\n"
        "    model: bundled:smollm2-135m-instruct\n"
        "pools:\n"
        "  fused:\n"
        "    experts: [remote-smollm2, smollm2-135m-instruct]\n"
        "    strategy: {type: fuse, weighting: uniform, candidates: 10}\n"
        "  fused-core:\n"
        "    experts: [smollm2-135m-instruct, remote-smollm2]\n"
        "    strategy: {type: fuse, weighting: core, gate: 0.5}\n"
        "  cascaded:\n"
        "    experts: [smollm2-135m-instruct, remote-smollm2]\n"
        "    strategy: {type: cascade, draft: remote-smollm2, threshold: 1.0}\n"
    )
    return path


def test_fuse_and_cascade_pools_with_a_vllm_expert_answer_through_chorus(
    vllm_server: VllmServer, tmp_path: Path
) -> None:
    chorus = ServerProcess(fuse_config(tmp_path, vllm_server))
    try:
        chorus.wait_ready(120)
        client = openai.OpenAI(base_url=f"{chorus.url}/v1", api_key="x", max_retries=0)
        alone = {
            name: client.chat.completions.create(
                model=name, messages=QUESTION, temperature=0, max_tokens=16
            )
            for name in ("remote-smollm2", "smollm2-135m-instruct")
        }
        texts = {name: a.choices[0].message.content for name, a in alone.items()}
        assert texts["remote-smollm2"] == texts["smollm2-135m-instruct"]  # one model, twice
        fused = client.chat.completions.create(
            model="fused", messages=QUESTION, temperature=0, max_tokens=16
        )
        assert fused.choices[0].message.content == texts["remote-smollm2"]
        info = fused.model_extra["chorus"]["fusion"]  # type: ignore[index]
        assert info["gate_skip_rate"] == 0.0 and info["steps"] > 1  # really fused every step
        assert set(info["share"]) == {"remote-smollm2", "smollm2-135m-instruct"}

        stream = client.chat.completions.create(
            model="fused-core", messages=QUESTION, temperature=0, max_tokens=16, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == texts["remote-smollm2"]

        cascaded = client.chat.completions.create(
            model="cascaded", messages=QUESTION, temperature=0, max_tokens=16
        )  # the vLLM expert drafts while its (estimated) entropy stays low
        assert cascaded.choices[0].message.content == texts["remote-smollm2"]
        share = cascaded.model_extra["chorus"]["cascade"]["share"]  # type: ignore[index]
        assert share["remote-smollm2"] > 0
    finally:
        chorus.stop()
