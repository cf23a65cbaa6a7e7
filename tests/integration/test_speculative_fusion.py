"""Speculative fusion on the real bundled models: drafting and looking ahead change no output.

The primary (SmolLM2) drafts, Gemma computes its views over the draft in one pass, and the steps
read their views from what was computed ahead (`ensemble.fuse`); a cascade's draft expert goes
ahead likewise, the strong expert's view computed ahead where it will decide (`ensemble.cascade`).
Every answer must be the one the step-by-step loop gives, greedy and sampled with a seed, gated
or not, across tokenizers that cut the text differently and through characters that take several
tokens.
"""

from __future__ import annotations

import pytest

from ensemble.cascade import CascadeStrategy
from ensemble.fuse import FusionStrategy
from ensemble.types import ChatMessage, GenerationRequest, SamplingParams
from serving.engines.transformers.engine import TransformersEngine
from serving.engines.transformers.session import TransformersSession
from tests.integration.conftest import run

pytestmark = pytest.mark.integration

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Write a Python function that reverses a string.",
    "Écris une phrase en français. 日本語も少し。",
]
# (weighting, gate, temperature)
VARIANTS = [("uniform", None, 0.0), ("uniform", 0.5, 0.0), ("core", None, 0.8)]


@pytest.mark.parametrize(("weighting", "gate", "temperature"), VARIANTS)
def test_drafted_answers_are_the_step_by_step_ones(
    fusion_pair: list[TransformersEngine], weighting: str, gate: float | None, temperature: float
) -> None:
    rounds = 0
    for prompt in PROMPTS:
        params = SamplingParams(max_tokens=16, temperature=temperature, seed=11)
        req = GenerationRequest("t", (ChatMessage("user", prompt),), params)
        step, draft = (
            FusionStrategy(weighting=weighting, gate=gate, draft_tokens=n)  # type: ignore[arg-type]
            for n in (1, 8)
        )
        stepwise, _ = run(step, req, fusion_pair)
        drafted, trace = run(draft, req, fusion_pair)
        assert drafted == stepwise, prompt
        assert trace.fusion is not None
        rounds += trace.fusion.draft_acceptance is not None
    assert rounds == len(PROMPTS)  # every answer was drafted, not stepped


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_drafted_cascades_are_the_step_by_step_ones(
    fusion_pair: list[TransformersEngine], temperature: float
) -> None:
    smollm2, gemma = fusion_pair
    shares = []
    for prompt in PROMPTS:
        params = SamplingParams(max_tokens=16, temperature=temperature, seed=11)
        req = GenerationRequest("t", (ChatMessage("user", prompt),), params)
        step, draft = (
            CascadeStrategy(draft=smollm2.name, window=2, threshold=1.0, draft_tokens=n)
            for n in (1, 8)
        )
        stepwise, _ = run(step, req, [gemma, smollm2])
        drafted, trace = run(draft, req, [gemma, smollm2])
        assert drafted == stepwise, prompt
        assert trace.cascade is not None and trace.cascade.draft_acceptance is not None
        shares.append(trace.cascade.share[gemma.name])
    assert 0 < sum(shares) < len(PROMPTS)  # the strong expert decided some steps, not all


def test_the_steps_after_a_draft_read_its_logits_and_run_no_model(
    fusion_pair: list[TransformersEngine],
) -> None:
    """The steps that follow a draft ask for the views the draft computed; running the model for
    them again doubled the primary's work (the draft's text growing had dropped them)."""
    engine = fusion_pair[0]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    req = GenerationRequest("t", (ChatMessage("user", PROMPTS[0]),), params)
    session = TransformersSession(
        engine._model, engine._tokenizer, engine.encode_prompt(req), engine._eos_ids
    )
    drafted = session.draft([], 4, 5)
    forwards: list[int] = []
    hook = engine._model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        for view in drafted:
            assert session.top_k(5) == view
            top = max(view.candidates, key=lambda c: c.logprob)
            session.give([(top.text, list(top.token_ids))])
    finally:
        hook.remove()
    assert len(drafted) == 4 and not forwards
