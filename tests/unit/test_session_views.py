"""Stepping separate sessions' caches together (`batch.gather`, `batch.scatter`), on tiny
random-weight models: every row's logits are those of its sequence decoded alone, and each cache,
given back, goes on alone as if it had never shared a forward (sliding windows included)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from serving.engines.transformers.batch import gather, scatter
from tests.unit.test_batch import MODELS, alone, prompt


def prefilled(model: Any, ids: list[int]) -> tuple[Any, torch.Tensor]:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    return out.past_key_values, out.logits[0, -1]


@pytest.mark.parametrize("kind", MODELS)
def test_caches_stepped_together_decode_as_if_alone(kind: str) -> None:
    model = MODELS[kind]()
    prompts = [prompt(2, 1), prompt(9, 2), prompt(15, 3)]  # the window is 6: all outgrow it
    steps = 10
    expected = [alone(model, p, steps + 2) for p in prompts]
    caches, lengths, last = [], [], []
    for p in prompts:
        cache, logits = prefilled(model, p)
        caches.append(cache)
        lengths.append(len(p))
        last.append(logits)
    with torch.inference_mode():
        for step in range(steps):
            tokens = torch.stack([logits.argmax() for logits in last])
            batch = gather(caches, lengths)
            logits = batch.step(model, tokens)
            scatter(batch, caches)
            lengths = [n + 1 for n in lengths]
            last = list(logits)
            for row, want in enumerate(expected):
                torch.testing.assert_close(last[row], want[step + 1], atol=1e-4, rtol=1e-4)
        # Given back, each cache goes on alone: twice, so a cropped window would show.
        for row, cache in enumerate(caches):
            for extra in range(2):
                out = model(
                    input_ids=last[row].argmax().view(1, 1), past_key_values=cache, use_cache=True
                )
                last[row] = out.logits[0, -1]
                want = expected[row][steps + 1 + extra]
                torch.testing.assert_close(last[row], want, atol=1e-4, rtol=1e-4)


def test_gather_leaves_the_caches_as_they_were() -> None:
    model = MODELS["gemma3-sliding"]()
    caches = [prefilled(model, prompt(n, n))[0] for n in (3, 8)]
    before = [[(layer.keys.clone(), layer.values.clone()) for layer in c.layers] for c in caches]
    batch = gather(caches, [3, 8])
    batch.step(model, torch.tensor([1, 2]))
    for cache, layers in zip(caches, before, strict=True):
        for layer, (keys, values) in zip(cache.layers, layers, strict=True):
            assert torch.equal(layer.keys, keys)
            assert torch.equal(layer.values, values)
