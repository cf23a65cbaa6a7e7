"""Decode sessions on the transformers engine: next-token candidates for fusion, text in.

A session holds a prompt, the text chosen so far (by whatever fused the experts) and a KV cache
that follows that text. `extend(text)` re-tokenizes only a window at the tail
(`common.retokenize`); when the tokens change under the cache (tokenizers merge whitespace and
word pieces differently as text grows), the cache is cropped to the longest common prefix and the
rest re-fed. Candidates follow every engine's rules (`common.candidates`). Every method runs on
the engine's worker thread.

The entropy: this session has the whole next-token distribution, but `NextTokens.entropy` is
the estimate every engine gives (`common.entropy`, from the top 20 log-probabilities), not the
exact entropy, so that a cascade `threshold` means the same for an expert here as on vLLM.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from functools import partial
from typing import Any

import torch

from ensemble.types import NextTokens
from serving.engines.common import candidates
from serving.engines.common.retokenize import AnswerTokens, tokenize_with_starts


class TransformersSession:
    def __init__(self, model: Any, tokenizer: Any, prompt_ids: list[int], eos_ids: frozenset[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.pieces = candidates.TokenizerPieces(tokenizer, eos_ids)
        self.answer = AnswerTokens(prompt_ids)  # prompt + the chosen text, tokenized
        self._tokenize = partial(tokenize_with_starts, self.tokenizer)
        self.prompt_len = len(prompt_ids)
        self.cache: Any = None
        self.cached: list[int] = []  # ids whose keys and values are in the cache
        self.logits: torch.Tensor | None = None  # next-token logits after `cached`
        self.recrops = 0  # times the tokenization changed under the cache (for diagnostics)

    @property
    def ids(self) -> list[int]:
        return self.answer.ids

    # -- text in -----------------------------------------------------------------------------

    def extend(self, text: str) -> None:
        """Append chosen text; re-tokenize from a few tokens back, not the whole output."""
        self.answer.extend(text, self._tokenize)

    def extend_ids(self, ids: list[int], text: str) -> None:
        """Append tokens this model chose itself (gated steps, one-expert pools): no re-tokenizing,
        so the session follows the model's own greedy path token for token."""
        self.answer.add_ids(ids, text)

    # -- candidates out ----------------------------------------------------------------------

    @torch.inference_mode()
    def top_k(self, k: int, full: bool = False) -> NextTokens:
        """The `k` most likely next pieces of text, renormalised over what is kept (the rules of
        `common.candidates`; a partial character is completed by following the model)."""
        logp = torch.log_softmax(self._sync().float(), dim=-1)
        top_lp, top_ids = logp.topk(min(candidates.view_size(k), logp.shape[-1]))
        entries = candidates.ranked(dict(zip(top_ids.tolist(), top_lp.tolist(), strict=True)))
        unfinished = candidates.partial_top(entries, self.pieces)
        completed = self._complete_character(*unfinished) if unfinished else None
        return candidates.next_tokens(
            entries, k, self.pieces, completed, logp.numpy() if full else None
        )

    def _complete_character(self, token: int, lp: float) -> candidates.Completion | None:
        """Follow the model greedily from a partial-character token until the bytes decode."""
        base = len(self.cached)
        saved = self.logits
        try:
            with closing(self._greedy_path(token, lp)) as path:
                return candidates.complete_character(path, self.pieces.decode)
        finally:
            self._crop_to(base)
            self.logits = saved

    def _greedy_path(self, token: int, lp: float) -> Generator[tuple[int, float], None, None]:
        """`token`, then the model's greedy tokens after it, fed as they are read."""
        while True:
            yield token, lp
            logits = self._feed([token])
            token = int(logits.argmax())
            lp = float(torch.log_softmax(logits.float(), dim=-1)[token])

    # -- the cache follows the ids -----------------------------------------------------------

    def _sync(self) -> torch.Tensor:
        """Bring the cache up to `ids`; return the logits for the next token."""
        common = 0
        for a, b in zip(self.cached, self.ids, strict=False):
            if a != b:
                break
            common += 1
        if common < len(self.cached):
            self.recrops += 1
            self._crop_to(common)
        if len(self.cached) == len(self.ids):
            if self.logits is not None:
                return self.logits
            self._crop_to(len(self.ids) - 1)  # recompute the last position's logits
        return self._feed(self.ids[len(self.cached) :])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([ids], device=self.model.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.past_key_values
        self.cached += ids
        logits: torch.Tensor = out.logits[0, -1, :]
        self.logits = logits
        return logits

    def _crop_to(self, length: int) -> None:
        remove = len(self.cached) - length
        if remove <= 0:
            return
        try:
            self.cache.crop(-remove)
        except (RuntimeError, ValueError):  # a layer that cannot roll back: start over
            self.cache = None
            self.cached = []
            self.logits = None
            if length:
                self._feed(self.ids[:length])
            return
        self.cached = self.cached[:length]
        self.logits = None

    def close(self) -> None:
        self.cache = None
        self.logits = None
