"""Dynamic Logit Fusion (`dlf`) on real Qwen2.5-Coder-0.5B experts and the shipped BoolQ adapter.

The 1.5B large model is optional (`make install-large`), so here the 0.5B plays the large model
too. That makes the paper's invariants exact on real models: alpha 0 is the large model alone;
a specialist equal to its base moves nothing, whatever alpha; and with the large model equal to
the base, the searched alpha is 1 and the answer is the specialist's own (P~ = Q_t there).
Drafting changes nothing, greedy or sampled; and the real server streams a `dlf` pool to the
`openai` SDK with each specialist's mean alpha in its metadata.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ensemble.dlf import LogitFusionStrategy
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.config import TransformersExpertConfig
from serving.engines.transformers.engine import TransformersEngine
from tests.conftest import ROOT, ServerProcess
from tests.integration.conftest import greedy, run

pytestmark = pytest.mark.integration

QWEN = "bundled:qwen2.5-coder-0.5b-instruct"
ADAPTER = ROOT / "configs" / "adapters" / "boolq"
PROMPTS = [
    "The Moon orbits the Earth about once a month.\nQuestion: does the moon orbit the earth?\n"
    "A. yes\nB. no\nAnswer with the letter of the correct option only.",
    "Write a Python function that returns the square of a number.",
]


def engine(name: str, adapter: Path | None = None) -> TransformersEngine:
    config = TransformersExpertConfig(model=QWEN, adapter=None if adapter is None else str(adapter))
    out = TransformersEngine(name, config)
    asyncio.run(out.start())
    return out


@pytest.fixture(scope="module")
def qwens() -> Iterator[dict[str, TransformersEngine]]:
    engines = {
        "large": engine("large"),
        "base": engine("base"),
        "same": engine("same"),  # the base again: a specialist that learned nothing
        "tuned": engine("tuned", ADAPTER),
    }
    yield engines
    for e in engines.values():
        asyncio.run(e.aclose())
    engines.clear()  # the weights go with the last references (tests/conftest.py trims the heap)


def request(prompt: str, **sampling: float) -> GenerationRequest:
    params = SamplingParams(max_tokens=12, temperature=sampling.get("temperature", 0.0), seed=3)
    return GenerationRequest("t", (ChatMessage("user", prompt),), params)


def fused(
    strategy: LogitFusionStrategy, req: GenerationRequest, engines: list[TransformersEngine]
) -> tuple[str, dict[str, float]]:
    text, trace = run(strategy, req, engines)
    return text, dict(zip(trace.experts, trace.weights, strict=True))


def dlf(**settings: float) -> LogitFusionStrategy:
    return LogitFusionStrategy(large="large", base="base", **settings)  # type: ignore[arg-type]


# First, before the module's engines load: the server loads its own three.
def test_the_server_streams_a_dlf_pool_with_its_weights(tmp_path: Path) -> None:
    config = tmp_path / "dlf.yaml"
    expert = f"{{model: {QWEN}}}"
    config.write_text(
        "experts:\n"
        f"  large: {expert}\n"
        f"  base: {expert}\n"
        f"  tuned: {{model: {QWEN}, adapter: {ADAPTER}}}\n"
        "pools:\n"
        "  w2s: {experts: [large, base, tuned], "
        "strategy: {type: dlf, large: large, base: base, draft_tokens: 4}}\n"
    )
    server = ServerProcess(config)
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        chunks = list(
            client.chat.completions.create(
                model="w2s",
                messages=[{"role": "user", "content": PROMPTS[0]}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        chorus = chunks[-1].model_extra["chorus"]
        assert chorus["strategy"] == "dlf" and chorus["experts"] == ["large", "base", "tuned"]
        weights = dict(zip(chorus["experts"], chorus["weights"], strict=True))
        assert weights["large"] == 1.0 and weights["tuned"] == pytest.approx(1.0, abs=0.05)
        assert chorus["fusion"]["weighting"] == "dlf"
        tuned = TransformersEngine(
            "tuned", TransformersExpertConfig(model=QWEN, adapter=str(ADAPTER))
        )
        asyncio.run(tuned.start())
        try:
            req = GenerationRequest(
                "t",
                (ChatMessage("user", PROMPTS[0]),),
                SamplingParams(max_tokens=8, temperature=0.0),
            )
            assert text == greedy(tuned, req)
        finally:
            asyncio.run(tuned.aclose())
    finally:
        server.stop()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_alpha_zero_is_the_large_models_own_greedy_output(qwens, prompt: str) -> None:
    req = request(prompt)
    pool = [qwens["tuned"], qwens["base"], qwens["large"]]  # roles, not order, decide
    text, weights = fused(dlf(alpha=0.0), req, pool)
    assert text == greedy(qwens["large"], req)
    assert weights == {"large": 1.0, "base": 0.0, "tuned": 0.0}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_specialist_equal_to_its_base_moves_nothing(qwens, prompt: str) -> None:
    req = request(prompt)
    pool = [qwens["large"], qwens["base"], qwens["same"]]
    want = greedy(qwens["large"], req)
    assert fused(dlf(), req, pool)[0] == want
    assert fused(dlf(alpha=2.0), req, pool)[0] == want


@pytest.mark.parametrize("prompt", PROMPTS)
def test_with_the_large_model_equal_to_its_base_the_specialist_answers(qwens, prompt) -> None:
    req = request(prompt)
    text, weights = fused(dlf(), req, [qwens["large"], qwens["base"], qwens["tuned"]])
    assert text == greedy(qwens["tuned"], req)
    assert weights["tuned"] == pytest.approx(1.0, abs=0.05)
    assert weights["base"] == pytest.approx(-weights["tuned"])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_drafting_changes_nothing(qwens, temperature: float) -> None:
    pool = [qwens["large"], qwens["base"], qwens["tuned"]]
    for prompt in PROMPTS:
        req = request(prompt, temperature=temperature)
        assert fused(dlf(draft_tokens=4), req, pool) == fused(dlf(), req, pool)
