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

from collections.abc import Generator, Sequence
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
        # Next-token logits after `cached[:n]`, by n: the last position's, and those a draft or
        # a look-ahead computed ahead of the chosen text (`draft`, `prefetch`).
        self.ahead: dict[int, torch.Tensor] = {}
        self.recrops = 0  # times the tokenization changed under the cache (for diagnostics)
        self.closed = False

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

    def give(self, pieces: Sequence[tuple[str, list[int]]]) -> None:
        """Append chosen pieces in order: text (`extend`), or the model's own ids (`extend_ids`)."""
        for text, ids in pieces:
            if ids:
                self.extend_ids(ids, text)
            else:
                self.extend(text)

    # -- candidates out ----------------------------------------------------------------------

    # -- looking ahead (speculative fusion) ------------------------------------------------

    @torch.inference_mode()
    def draft(self, given: Sequence[tuple[str, list[int]]], n: int, k: int) -> list[NextTokens]:
        """After the `given` pieces (`give`), the views along this model's own greedy path for up
        to `n` pieces from the current text, the path's logits kept for later `top_k` calls, the
        text left as it was. The path takes each view's top candidate, as a lone expert's greedy
        step does, and ends at the end of sequence."""
        self.give(given)
        saved = self.answer.snapshot()
        views: list[NextTokens] = []
        path: dict[int, torch.Tensor] = {}
        try:
            while len(views) < n:
                view = self.top_k(k)
                path[len(self.ids)] = self.ahead[len(self.ids)]
                views.append(view)
                top = max(view.candidates, key=lambda c: c.logprob)
                if top.end:
                    break
                self.answer.add_ids(top.token_ids, top.text)
        finally:
            self.answer.restore(saved)
            # `_sync` dropped the path's earlier logits as the draft's text grew; the steps that
            # follow the draft ask for them again.
            self.ahead.update(path)
        return views

    @torch.inference_mode()
    def prefetch(
        self,
        given: Sequence[tuple[str, list[int]]],
        pieces: list[tuple[str, list[int]]],
        every: bool = True,
    ) -> None:
        """After the `given` pieces (`give`), compute, in one forward pass, the logits the coming
        `top_k` calls would ask for if `pieces` (text, or this model's own ids) are appended: the
        guess is the tail tokenized as `extend` and `extend_ids` would. Nothing changes what the
        session answers: a later `top_k` whose tokens are not a prefix of the guess runs the
        model as before. Without `every`, only the last position's logits are kept (a catch-up:
        the output layer is most of a small model's work per token)."""
        self.give(given)
        unfed = self.unfed_after(pieces)
        if unfed:
            self._feed(unfed, keep_all=every)

    def run(self, ids: list[int]) -> None:
        """Run `ids` after the cache, keeping only the logits after the last."""
        self._feed(ids)

    def unfed_after(self, pieces: Sequence[tuple[str, list[int]]]) -> list[int]:
        """Crop the cache to what holds for the text after `pieces` (as `prefetch` guesses it);
        return the ids to run to reach it."""
        saved = self.answer.snapshot()
        try:
            self.give(pieces)
            guess = list(self.ids)
        finally:
            self.answer.restore(saved)
        common = self._common(guess)
        if common < len(self.cached):
            self._crop_to(common)
        return guess[len(self.cached) :]

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
        base = len(self.ids)
        self._crop_to(base)  # a look-ahead may have run further
        saved = self.ahead.get(base)
        try:
            with closing(self._greedy_path(token, lp)) as path:
                return candidates.complete_character(path, self.pieces.decode)
        finally:
            self._crop_to(base)
            if saved is not None:
                self.ahead[base] = saved

    def _greedy_path(self, token: int, lp: float) -> Generator[tuple[int, float], None, None]:
        """`token`, then the model's greedy tokens after it, fed as they are read."""
        while True:
            yield token, lp
            logits = self._feed([token])
            token = int(logits.argmax())
            lp = float(torch.log_softmax(logits.float(), dim=-1)[token])

    # -- the cache follows the ids -----------------------------------------------------------

    def _common(self, ids: list[int]) -> int:
        """How many of `ids` the cache holds, from the start."""
        common = 0
        for a, b in zip(self.cached, ids, strict=False):
            if a != b:
                break
            common += 1
        return common

    def unfed(self) -> list[int]:
        """Crop the cache to what still holds for `ids`; return the ids to run before the next
        view (none when its logits are at hand: computed ahead by a draft or a look-ahead, or
        by a batched step, `accept`)."""
        ids = self.ids
        common = self._common(ids)
        if common == len(ids) and common in self.ahead:
            return []
        if common < len(self.cached):
            self.recrops += common < len(ids)  # the tokens changed, not a look-ahead unused
            self._crop_to(common)
        if len(self.cached) == len(ids):
            self._crop_to(len(ids) - 1)  # recompute the last position's logits
        return ids[len(self.cached) :]

    def accept(self, ids: list[int], logits: torch.Tensor) -> None:
        """Record ids run in a batch with other sessions (its cache row is already back in
        `cache`, `batch.scatter`), and the logits after the last."""
        self.cached += ids
        self.ahead[len(self.cached)] = logits

    def _sync(self) -> torch.Tensor:
        """Bring the cache up to `ids`; return the logits for the next token."""
        unfed = self.unfed()
        if unfed:
            self._feed(unfed)
        ids = self.ids
        for passed in [n for n in self.ahead if n < len(ids)]:  # the text only grows
            del self.ahead[passed]
        return self.ahead[len(ids)]

    def _feed(self, ids: list[int], *, keep_all: bool = False) -> torch.Tensor:
        """Run `ids` after the cache; keep the logits after the last one (after each, with
        `keep_all`) and return the last."""
        out = self.model(
            input_ids=torch.tensor([ids], device=self.model.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=len(ids) if keep_all else 1,
        )
        self.cache = out.past_key_values
        self.cached += ids
        rows = out.logits[0]
        first = len(self.cached) - rows.shape[0] + 1  # the prefix length of the first row
        for offset in range(rows.shape[0]):
            self.ahead[first + offset] = rows[offset]
        logits: torch.Tensor = rows[-1]
        return logits

    def _crop_to(self, length: int) -> None:
        remove = len(self.cached) - length
        if remove <= 0:
            return
        self.ahead = {n: row for n, row in self.ahead.items() if n <= length}
        try:
            self.cache.crop(-remove)
        except (RuntimeError, ValueError):  # a layer that cannot roll back: start over
            kept = self.cached[:length]
            self.cache = None
            self.cached = []
            self.ahead = {}
            if length:
                self._feed(kept)
            return
        self.cached = self.cached[:length]

    def close(self) -> None:
        self.closed = True
        self.cache = None
        self.ahead = {}
