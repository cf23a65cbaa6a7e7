from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engines.transformers.sampling import _nucleus, logprobs_of, sample


def test_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 1.0, g).tolist() == [1, 0]


def test_same_seed_same_samples() -> None:
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    a = sample(logits, 1.0, 0.9, torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, 0.9, torch.Generator().manual_seed(7))
    c = sample(logits, 1.0, 0.9, torch.Generator().manual_seed(8))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5, 1.9]])
    for seed in range(20):
        assert sample(logits, 1.5, 0.01, torch.Generator().manual_seed(seed)).item() == 1


@settings(max_examples=50)
@given(
    st.lists(st.floats(-5, 5), min_size=2, max_size=30),
    st.floats(0.01, 1.0),
)
def test_nucleus_keeps_the_smallest_top_set_reaching_p(values: list[float], top_p: float) -> None:
    probs = torch.softmax(torch.tensor([values]), dim=-1)
    kept = _nucleus(probs, top_p)[0]
    mask = kept > 0
    # Every kept token is at least as likely as every dropped one, and the kept mass reaches p
    # (up to float error), while dropping the least likely kept token would fall short.
    if (~mask).any():
        assert probs[0][mask].min() >= probs[0][~mask].max()
    mass = probs[0][mask].sum().item()
    assert mass >= top_p - 1e-5 or mask.all()
    assert mass - probs[0][mask].min().item() < top_p + 1e-6


def test_logprobs_of_reports_the_unscaled_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    chosen_lp, top_ids, top_lp = logprobs_of(logits, torch.tensor([1]), 2)
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(chosen_lp, expected[:, 1])
    assert top_ids.tolist() == [[0, 1]]
    assert torch.allclose(top_lp, expected[:, :2])
