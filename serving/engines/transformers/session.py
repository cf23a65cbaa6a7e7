"""Decode sessions on the transformers engine: next-token candidates for fusion, text in.

A session holds a prompt, the text chosen so far (by whatever fused the experts) and a KV cache
that follows that text. `extend(text)` re-tokenizes only a window at the tail; when the tokens
change under the cache (tokenizers merge whitespace and word pieces differently as text grows),
the cache is cropped to the longest common prefix and the rest re-fed. Every method runs on the
engine's worker thread.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ensemble.types import NextTokens
from serving.engines.common.candidates import (
    MAX_BYTE_LOOKAHEAD,
    REPLACEMENT,
    TAIL_TOKENS,
    renormalised,
)


class TransformersSession:
    def __init__(self, model: Any, tokenizer: Any, prompt_ids: list[int], eos_ids: frozenset[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.special_ids = frozenset(tokenizer.all_special_ids) | eos_ids
        self.prompt_len = len(prompt_ids)
        self.ids = list(prompt_ids)  # prompt + the chosen text, tokenized
        self.starts: list[int] = []  # character offset in `text` where each generated token starts
        self.text = ""
        self.cache: Any = None
        self.cached: list[int] = []  # ids whose keys and values are in the cache
        self.logits: torch.Tensor | None = None  # next-token logits after `cached`
        self.recrops = 0  # times the tokenization changed under the cache (for diagnostics)
        self._pieces: dict[int, str] = {}

    # -- text in -----------------------------------------------------------------------------

    def extend(self, text: str) -> None:
        """Append chosen text; re-tokenize from a few tokens back, not the whole output."""
        if not text:
            return
        self.text += text
        generated = self.ids[self.prompt_len :]
        keep = max(0, len(generated) - TAIL_TOKENS)
        offset = (
            self.starts[keep] if keep < len(self.starts) else 0 if keep == 0 else len(self.text)
        )
        encoded = self.tokenizer(
            self.text[offset:], add_special_tokens=False, return_offsets_mapping=True
        )
        tail_ids: list[int] = encoded["input_ids"]
        tail_starts = [offset + start for start, _ in encoded["offset_mapping"]]
        self.ids = self.ids[: self.prompt_len + keep] + tail_ids
        self.starts = self.starts[:keep] + tail_starts

    def extend_ids(self, ids: list[int], text: str) -> None:
        """Append tokens this model chose itself (gated steps, one-expert pools): no re-tokenizing,
        so the session follows the model's own greedy path token for token."""
        start = len(self.text)
        self.text += text
        self.ids += ids
        self.starts += [start] * len(ids)

    # -- candidates out ----------------------------------------------------------------------

    @torch.inference_mode()
    def top_k(self, k: int, full: bool = False) -> NextTokens:
        """The `k` most likely next pieces of text, renormalised over what is kept.

        Special tokens other than end-of-sequence are dropped; every end-of-sequence token
        becomes one `end` candidate (text ""). A candidate that is only part of a UTF-8
        character is completed by greedy look-ahead when it is the top one, else dropped. Two
        tokens with the same text become one candidate carrying both masses.
        """
        logp = torch.log_softmax(self._sync().float(), dim=-1)
        top_lp, top_ids = logp.topk(min(k + 8, logp.shape[-1]))
        mass: dict[str, float] = {}
        ids: dict[str, tuple[int, ...]] = {}
        for rank, (token, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist(), strict=True)):
            if len(mass) >= k:
                break
            path: tuple[int, ...]
            if token in self.eos_ids:
                text, path = "", (token,)
            elif token in self.special_ids:
                continue
            else:
                text, path = self._piece(token), (token,)
                if REPLACEMENT in text or not text:
                    completed = self._complete_character(token, lp) if rank == 0 else None
                    if completed is None:
                        continue
                    text, path, lp = completed
            mass[text] = mass.get(text, 0.0) + math.exp(lp)
            ids.setdefault(text, path)
        candidates = renormalised(mass, ids)
        entropy = float(-(logp.exp() * logp).sum())
        return NextTokens(candidates, entropy, logp.numpy() if full else None)

    def _piece(self, token: int) -> str:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token])
        return piece

    def _complete_character(
        self, token: int, lp: float
    ) -> tuple[str, tuple[int, ...], float] | None:
        """Follow the model greedily from a partial-character token until the bytes decode."""
        base = len(self.cached)
        saved = self.logits
        ids, total = [token], lp
        try:
            for _ in range(MAX_BYTE_LOOKAHEAD):
                logits = self._feed([ids[-1]])
                text = self.tokenizer.decode(ids)
                if text and REPLACEMENT not in text:
                    return text, tuple(ids), total
                nxt = int(logits.argmax())
                total += float(torch.log_softmax(logits.float(), dim=-1)[nxt])
                ids.append(nxt)
            text = self.tokenizer.decode(ids)
            return (text, tuple(ids), total) if text and REPLACEMENT not in text else None
        finally:
            self._crop_to(base)
            self.logits = saved

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
