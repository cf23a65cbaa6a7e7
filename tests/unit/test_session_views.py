"""Stepping separate sessions' caches together (`batch.gather`, `batch.scatter`), on tiny
random-weight models: every row's logits are those of its sequence decoded alone, and each cache,
given back, goes on alone as if it had never shared a forward (sliding windows included)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from serving.engines.transformers.batch import can_drop, gather, scatter
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


@pytest.mark.parametrize("kind", MODELS)
def test_caches_run_several_tokens_together_as_if_alone(kind: str) -> None:
    model = MODELS[kind]()
    prompts = [prompt(4, 5), prompt(12, 6)]
    expected = [alone(model, p, 6) for p in prompts]
    caches = [prefilled(model, p)[0] for p in prompts]
    # Each row's next three greedy tokens in one forward, then three more.
    with torch.inference_mode():
        for start in (0, 3):
            tokens = torch.tensor(
                [[int(want[start + i].argmax()) for i in range(3)] for want in expected]
            )
            batch = gather(caches, [len(p) + start for p in prompts])
            logits = batch.step(model, tokens)
            scatter(batch, caches)
            for row, want in enumerate(expected):
                torch.testing.assert_close(logits[row], want[start + 3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", MODELS)
def test_rows_feeding_fewer_tokens_run_their_last_ones_again(kind: str) -> None:
    model = MODELS[kind]()
    prompts = [prompt(3, 7), prompt(4, 8)]  # short: the window (6) has dropped nothing yet
    expected = [alone(model, p, 3) for p in prompts]
    caches = [prefilled(model, p)[0] for p in prompts]
    assert all(can_drop(cache, 2) for cache in caches)
    greedy = [[int(want[i].argmax()) for i in range(3)] for want in expected]
    # Row 0 feeds three new tokens; row 1 one, after running its last two prompt tokens again.
    tokens = torch.tensor([greedy[0], prompts[1][-2:] + greedy[1][:1]])
    with torch.inference_mode():
        batch = gather(caches, [3, 4], drop=[0, 2])
        logits = batch.step(model, tokens)
        scatter(batch, caches)
        torch.testing.assert_close(logits[0], expected[0][3], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1], expected[1][1], atol=1e-4, rtol=1e-4)
        # Row 1 goes on alone from its cache.
        out = model(input_ids=torch.tensor([greedy[1][1:2]]), past_key_values=caches[1])
        torch.testing.assert_close(out.logits[0, -1], expected[1][2], atol=1e-4, rtol=1e-4)


def test_a_window_that_dropped_positions_cannot_drop_more() -> None:
    model = MODELS["gemma3-sliding"]()
    cache, _ = prefilled(model, prompt(9, 9))  # longer than the window of 6
    assert not can_drop(cache, 1)
    assert can_drop(cache, 0)
