"""Token-level fusion on the real bundled models (SmolLM2: 49k vocabulary; Gemma: 262k)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ensemble.cascade import CascadeStrategy
from ensemble.fuse import FusionStrategy
from ensemble.stepwise import Step
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.config import load_config
from serving.engines.transformers.engine import TransformersEngine
from tests.conftest import DEFAULT_CONFIG
from tests.integration.conftest import greedy, run

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is 8 times 5?",
    "What is the capital of Peru?",
    "Écris une phrase en français. 日本語も少し。",
    "List three colours.",
]


@pytest.fixture(scope="module")
def experts() -> Iterator[tuple[TransformersEngine, TransformersEngine]]:
    config = load_config(DEFAULT_CONFIG)
    smollm2 = TransformersEngine("smollm2-135m-instruct", config.experts["smollm2-135m-instruct"])
    gemma = TransformersEngine("gemma3-270m", config.experts["gemma3-270m"])
    asyncio.run(smollm2.start())
    asyncio.run(gemma.start())
    yield smollm2, gemma
    asyncio.run(smollm2.aclose())
    asyncio.run(gemma.aclose())


def request(prompt: str, max_tokens: int = 20, **params: float) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=params.pop("temperature", 0.0))
    return GenerationRequest("t", (ChatMessage("user", prompt),), sampling)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_one_expert_fuse_pool_is_its_greedy_output(experts, prompt: str) -> None:
    smollm2, gemma = experts
    for engine in (smollm2, gemma):
        req = request(prompt)
        out, trace = run(FusionStrategy(), req, [engine])
        assert out == greedy(engine, req)
        assert trace.fusion.share == {engine.name: 1.0}


@pytest.mark.parametrize("weighting", ["uniform", "core", "kl_centroid"])
def test_two_copies_of_one_expert_fuse_to_its_greedy_output(experts, weighting: str) -> None:
    smollm2, _ = experts
    for prompt in PROMPTS[:2]:
        req = request(prompt)
        out, trace = run(FusionStrategy(weighting=weighting), req, [smollm2, smollm2])
        assert out == greedy(smollm2, req), weighting
        assert trace.fusion.gate_skip_rate == 0.0  # really fused every step


def test_gate_zero_is_the_primary_alone(experts) -> None:
    smollm2, gemma = experts
    req = request(PROMPTS[0])
    out, trace = run(FusionStrategy(gate=0.0), req, [smollm2, gemma])
    assert out == greedy(smollm2, req)
    assert trace.fusion.gate_skip_rate == 1.0


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prompt=st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40
    ),
    weighting=st.sampled_from(["uniform", "core"]),
)
def test_fused_text_is_valid_utf8_and_the_chosen_pieces_joined(experts, prompt, weighting) -> None:
    smollm2, gemma = experts
    steps: list[Step] = []
    strategy = FusionStrategy(weighting=weighting, observer=steps.append)
    out, trace = run(strategy, request(prompt, max_tokens=12), [smollm2, gemma])
    assert out.encode("utf-8").decode("utf-8") == out
    assert "\ufffd" not in out
    chosen = "".join(s.text for s in steps)
    stop = "\nUser:"
    assert out == (chosen.split(stop)[0] if stop in chosen else chosen)
    for step in steps:
        assert all(w >= 0 for w in step.weights.values())
        assert sum(step.weights.values()) == pytest.approx(1.0)
    assert sum(trace.fusion.share.values()) == pytest.approx(1.0, abs=1e-3)


def test_heterogeneous_fusion_uses_both_experts(experts) -> None:
    smollm2, gemma = experts
    shares = []
    for prompt in PROMPTS:
        _, trace = run(FusionStrategy(weighting="uniform"), request(prompt), [smollm2, gemma])
        shares.append(trace.fusion.share["gemma3-270m"])
    assert max(shares) > 0  # Gemma's candidates won some steps


def test_cascade_thresholds(experts) -> None:
    smollm2, gemma = experts
    req = request(PROMPTS[1])
    always, trace = run(CascadeStrategy(draft="gemma3-270m", threshold=0.0), req, [smollm2, gemma])
    assert always == greedy(smollm2, req)
    assert trace.cascade.share["smollm2-135m-instruct"] == 1.0
    never, trace = run(
        CascadeStrategy(draft="gemma3-270m", threshold=float("inf")), req, [smollm2, gemma]
    )
    assert never == greedy(gemma, req)
    assert trace.cascade.share["gemma3-270m"] == 1.0
