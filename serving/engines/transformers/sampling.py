"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """Pick one token id per row of `logits` (rows, vocab). `temperature == 0` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches `top_p`."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # keeps the top token
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def logprobs_of(
    logits: torch.Tensor, chosen: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's own distribution (before temperature), as vLLM reports.

    Returns (chosen logprob (rows,), top ids (rows, k), top logprobs (rows, k)).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    top_lp, top_ids = logp.topk(top_k, dim=-1) if top_k else (logp[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_ids, top_lp
